"""The `merge` stage: average checkpoints, interpolate toward the start model, add a chat vector; then evaluate.

    runs/<name>/merged/                   the run's final model, a plain Hugging Face folder
    runs/<name>/merged/graft-merge.json   what went in: the averaged folders, alpha, the chat vector, what it skipped

Interpolating between the start model and the trained one (`alpha`) trades the target language's gain against
the source languages' loss along a line (Wortsman et al. 2022, WiSE-FT); averaging the last checkpoints is a cheap
stand-in for the EMA; the chat vector (Huang et al. 2024) puts back the instruction following that continued
pre-training of an instruct model wears off: `trained + scale · (instruct − base)`, on the rows they share when a
vocabulary extension made the embeddings longer. The merged model is evaluated like the training's evaluations
(`eval:` on the same subsets), as the last record of metrics.jsonl, so that the verdict describes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from graftlm.errors import GraftError
from graftlm.evaluate.suite import Evaluator
from graftlm.models import load_model, load_tokenizer, save_model
from graftlm.progress import log
from graftlm.recipe import Recipe
from graftlm.runs import RunDir
from graftlm.stage import Stage
from graftlm.train.checkpoint import complete_checkpoints

Weights = dict[str, torch.Tensor]
MERGED = "merged"
"""The `model` tag of the merged model's evaluation in metrics.jsonl."""


def average(weights: list[Weights]) -> Weights:
    return {name: sum(w[name].float() for w in weights) / len(weights) for name in weights[0]}


def interpolate(start: Weights, trained: Weights, alpha: float) -> Weights:
    """`start + alpha · (trained − start)`, tensor by tensor."""
    return {name: start[name].float() + alpha * (tensor.float() - start[name].float())
            for name, tensor in trained.items()}


def add_task_vector(weights: Weights, instruct: Weights, base: Weights, scale: float = 1.0) -> tuple[Weights, list]:
    """`weights + scale · (instruct − base)`; a matrix with more rows than the vector (an extended vocabulary)
    gets it on its leading rows. Returns the result and the names that no vector covers (left as they were)."""
    merged, skipped = {}, []
    for name, tensor in weights.items():
        if name not in instruct or name not in base:
            merged[name] = tensor
            skipped.append(name)
            continue
        vector = instruct[name].float() - base[name].float()
        if vector.shape != tensor.shape and (vector.shape[1:] != tensor.shape[1:] or len(vector) > len(tensor)):
            raise GraftError(f"merge.chat_vector: {name} is {tuple(vector.shape)} in the instruct and base models "
                             f"but {tuple(tensor.shape)} in the trained one: not the same architecture")
        result = tensor.float().clone()
        result[:len(vector)] += scale * vector
        merged[name] = result
    return merged, skipped


class Merge(Stage):
    name = "merge"
    needs = ("train",)
    outputs = ("merged",)

    def enabled(self):
        return self.recipe.merge is not None

    def when_disabled(self):
        """Without a merge section, what an earlier recipe merged goes, so the trained model is the result again."""
        if self.run_dir.merged.exists():
            shutil.rmtree(self.run_dir.merged)
            self.run_dir.write_metrics(_without_merged(self.run_dir.read_metrics()))

    def marker(self, unit):
        return self.run_dir.merge_marker

    def fingerprint(self, unit):
        recipe, run = self.recipe, self.run_dir
        trained = run.training_summary()
        if not trained:
            raise GraftError(f"merge: {run.model} is not trained yet")
        folders = _trained_folders(run, recipe.merge.average_last, trained["step"])
        return [recipe.merge.model_dump(mode="json"), trained["fingerprint"], [str(f) for f in folders],
                str(run.start_model), recipe.eval.model_dump(mode="json")]

    def up_to_date(self, unit, key):
        evaluated = (any(r.get("model") == MERGED for r in self.run_dir.read_metrics())
                     or not self.recipe.eval.names_anything)
        return super().up_to_date(unit, key) and evaluated

    def run(self, unit, key):
        merge_and_evaluate(self.recipe, self.run_dir, key)


def merge_and_evaluate(recipe: Recipe, run: RunDir, key: str) -> Path:
    """Write runs/<name>/merged/ (its marker holding `key`) and evaluate it as the last record of metrics.jsonl."""
    config, chat = recipe.merge, recipe.merge.chat_vector
    trained = run.training_summary()
    folders = _trained_folders(run, config.average_last, trained["step"])
    model = load_model(str(folders[-1]), trust_remote_code=recipe.trust_remote_code)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    if len(folders) > 1:
        weights = average([weights] + [_weights(f, recipe) for f in folders[:-1]])
        log(f"merge: averaged {len(folders)} checkpoints ({', '.join(f.name for f in folders)})")
    if config.alpha != 1.0:
        weights = interpolate(_weights(run.start_model, recipe), weights, config.alpha)
        log(f"merge: {config.alpha:g} of the way from the start model to the trained one")
    skipped: list[str] = []
    if chat is not None:
        weights, skipped = add_task_vector(weights, _weights(chat.instruct, recipe), _weights(chat.base, recipe),
                                           chat.scale)
        log(f"merge: added {chat.scale:g} · ({chat.instruct} − {chat.base})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    tokenizer = load_tokenizer(str(run.start_model), recipe.trust_remote_code)
    record = {"fingerprint": key, "averaged": [str(f) for f in folders], "alpha": config.alpha,
              "start_model": str(run.start_model),
              "chat_vector": chat.model_dump(mode="json") if chat else None, "not_in_chat_vector": skipped,
              "step": trained["step"], "tokens": trained["tokens"]}
    save_model(model, tokenizer, run.merged, extra_files={run.merge_marker.name: json.dumps(record, indent=2)})
    log(f"merge: wrote {run.merged}")

    evaluator = Evaluator.for_recipe(recipe.eval, tokenizer, work_dir=run.inside("eval"),
                                     target=recipe.target_language)
    kept = _without_merged(run.read_metrics())
    if evaluator is not None:
        kept.append({"step": trained["step"], "tokens": trained["tokens"], "model": MERGED,
                     "eval": evaluator(model, step=trained["step"], boundary=True)})
    run.write_metrics(kept)
    return run.merged


def _without_merged(metrics: list[dict]) -> list[dict]:
    """metrics.jsonl less the evaluations of a merged model (made again whenever the merge is)."""
    return [r for r in metrics if r.get("model") != MERGED]


def _trained_folders(run: RunDir, count: int, final_step: int) -> list[Path]:
    """The model folders to average, oldest first: the last `count` checkpoints, or the exported model alone."""
    if count == 1:
        return [run.model]
    checkpoints = [folder for step, folder in complete_checkpoints(run) if step <= final_step][-count:]
    if len(checkpoints) < count:
        raise GraftError(f"merge.average_last: {count} checkpoints asked for, {len(checkpoints)} kept in "
                         f"{run.checkpoints} (train.keep_checkpoints, train.checkpoint_every)")
    return checkpoints


def _weights(spec, recipe: Recipe) -> Weights:
    model = load_model(str(spec), trust_remote_code=recipe.trust_remote_code)
    return {name: p.detach() for name, p in model.named_parameters()}
