"""All of a recipe's evaluations, loaded and tokenised once, run against a model in one call.

    evaluator = Evaluator.from_config(recipe.eval, tokenizer, work_dir=run.root / "eval", target="vi",
                                      token_languages=token_languages_for_run(recipe, run, len(tokenizer)))
    results = evaluator(model)                             # the during-training subsets of text and choice sets
    results = evaluator(model, step=120)                   # ... and the harness tasks when eval.harness.every
                                                           #     divides the step
    results = evaluator(model, step=0, boundary=True)      # the start or the end of training: everything
    results = evaluator(model, full=True)                  # everything, every document and item (`graft eval`)
    # {"text": {"vi": {"bpb", "tokens_per_byte", "tokens_per_word", "documents"}},   (zh: tokens_per_character)
    #  "choice": {"xcopa_vi": {"accuracy", "accuracy_norm", "ci95", "n"}},
    #  "harness": {"graft_xcopa_vi": {"acc", "acc_stderr", "n", ...}},          only when it ran
    #  "generate": {"vi": {"same_language", "mixed", "distinct_2", "samples", ...}},   only when it ran
    #  "lens": {"vi": {"layers", "bpb", "shares", "target_share", "english_share", ...}}}   only when it ran

`graft eval` builds the same object from its options (the set names are then the file paths), so the numbers
printed by `graft eval --json` and those written during training come from one code path.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from graftlm.evaluate.bpb import TextSet, bits_per_byte, fertility, load_text_set
from graftlm.evaluate.choice import ChoiceSet, EncodedChoice, choice_accuracy, encode_item, load_choice_set
from graftlm.evaluate.config import EvalConfig
from graftlm.evaluate.generate import PromptSet, load_prompts
from graftlm.evaluate.scoring import context_length, pad_token_id, start_token_id

if TYPE_CHECKING:
    from rich.console import Group
    from rich.progress import Progress
    from rich.table import Table
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from graftlm.evaluate.harness import Harness
    from graftlm.evaluate.lens import TokenLanguages

ENGLISH = "en"


@dataclass(frozen=True)
class _EncodedChoiceSet:
    choice_set: ChoiceSet
    encoded: list[list[EncodedChoice]]


class Evaluator:
    def __init__(self, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase", text: dict[str, TextSet],
                 choice: dict[str, ChoiceSet], harness: "Harness | None" = None,
                 prompts: dict[str, PromptSet] | None = None, lens_text: dict[str, TextSet] | None = None,
                 token_languages: "TokenLanguages | None" = None, target: str | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.start_id = start_token_id(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.text = text
        self.choice = {name: _EncodedChoiceSet(s, [encode_item(item, tokenizer) for item in s.items])
                       for name, s in choice.items()}
        self.harness = harness
        self.prompts = prompts or {}
        self.lens_text = lens_text or {}
        self.token_languages = token_languages
        self.target = target

    @classmethod
    def for_recipe(cls, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase", **options) -> "Evaluator | None":
        """The evaluator of a recipe's `eval:` section (`options`: see from_config); None when it names nothing."""
        if not config.names_anything:
            return None
        return cls.from_config(config, tokenizer, **options)

    @classmethod
    def from_config(cls, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase",
                    work_dir: str | os.PathLike | None = None, token_languages: "TokenLanguages | None" = None,
                    target: str | None = None, languages: dict[str, str] | None = None) -> "Evaluator":
        """Read and tokenise every set of `config` (a bad file fails here, before any model work).

        `work_dir`: where lm-eval's generated tasks, their data and the datasets cache go (a run passes a folder
        of its run directory; default a temporary folder). `token_languages`: the language of each token for the
        logit lens (a run passes `lens.token_languages_for_run(...)`); by default counted in the lens texts.
        `target`: the target language, whose share the lens reports as `target_share` (default: the first lens
        language that is not English). A text set's language is `languages[name]`, else its name (`vi`, `zh`):
        it decides what fertility counts.
        """
        languages = languages or {}
        text = {name: load_text_set(path, tokenizer, config.text_field, lang=languages.get(name, name))
                for name, path in config.text.items()}
        choice = {name: load_choice_set(c.path, c.format, c.lang) for name, c in config.choice.items()}
        harness = None
        if config.harness.tasks:
            from graftlm.evaluate.harness import Harness

            harness = Harness(config.harness, work_dir, config.text_field)
        prompts = {lang: load_prompts(lang, path, tokenizer, config.generate, config.text_field)
                   for lang, path in config.generate.prompts.items()}
        lens_text, target = {}, target
        if config.lens.text:
            from graftlm.languages import normalize_language
            from graftlm.evaluate.lens import TokenLanguages

            whole = {lang: load_text_set(path, tokenizer, config.text_field) for lang, path in config.lens.text.items()}
            lens_text = {lang: s.head(config.lens.max_documents) for lang, s in whole.items()}
            if token_languages is None:
                token_languages = TokenLanguages.from_documents(
                    {normalize_language(lang): s.documents for lang, s in whole.items()}, len(tokenizer),
                    tokenizer.all_special_ids)
            lens_languages = [normalize_language(lang) for lang in whole]
            target = normalize_language(target) if target else next((l for l in lens_languages if l != ENGLISH),
                                                                    None)
        return cls(config, tokenizer, text, choice, harness, prompts, lens_text, token_languages, target)

    def __call__(self, model: "PreTrainedModel", full: bool = False, progress: "Progress | None" = None,
                 step: int | None = None, boundary: bool = False) -> dict:
        """Score every set; `full=False` scores the first eval.max_documents / eval.max_items of each.

        `boundary=True` (the start or the end of training) and `full=True` also run the harness tasks, the
        generations and the logit lens; the harness also runs when eval.harness.every divides `step`. Results
        have a "harness", "generate" or "lens" key only when those ran. Runs under torch.no_grad in eval mode and
        puts the model back in the mode it was in.
        """
        config = self.config
        max_length = context_length(model, config.max_length)
        settings = dict(start_id=self.start_id, pad_id=self.pad_id, max_length=max_length,
                        batch_size=config.batch_size, dtype=config.dtype)
        results: dict = {"text": {}, "choice": {}}
        self._seconds: dict[str, float] = {}
        for name, text_set in self.text.items():
            subset = text_set.head(None if full else config.max_documents)
            with self._part(progress, f"bpb {name}") as on_batch:
                results["text"][name] = bits_per_byte(model, subset, **settings, on_batch=on_batch)
        for name, encoded_set in self.choice.items():
            count = len(encoded_set.encoded) if full or config.max_items is None else config.max_items
            labels = [item.label for item in encoded_set.choice_set.items[:count]]
            with self._part(progress, f"choice {name}") as on_batch:
                results["choice"][name] = choice_accuracy(model, encoded_set.encoded[:count], labels, **settings,
                                                          on_batch=on_batch)
        everything = full or boundary
        every = config.harness.every
        if self.harness is not None and (everything or (every is not None and step is not None and step % every == 0)):
            with self._part(None, "harness"):  # its own bar, a task at a time
                results["harness"] = self._harness(model, progress)
        if self.prompts and everything:
            results["generate"] = self._generate(model, progress)
        if self.lens_text and everything:
            results["lens"] = self._lens(model, progress, max_length)
        results["seconds"] = self._seconds
        return results

    @contextlib.contextmanager
    def _part(self, progress: "Progress | None", description: str) -> Iterator[Callable[[int, int], None] | None]:
        """One part of an evaluation (a set scored, generations, the lens): its seconds go to the results'
        "seconds"; a progress bar while it runs (removed after, so that evaluations during training do not pile up
        bars), None without a Progress."""
        started = time.perf_counter()
        task = progress.add_task(description, total=None, status="") if progress is not None else None
        try:
            yield None if task is None else lambda done, total: progress.update(task, completed=done, total=total)
        finally:
            if task is not None:
                progress.remove_task(task)
            self._seconds[description] = round(time.perf_counter() - started, 2)

    def _harness(self, model: "PreTrainedModel", progress: "Progress | None") -> dict:
        task = progress.add_task("harness", total=len(self.harness.names), status="") if progress else None

        def on_task(name: str) -> None:
            if progress is not None:
                done = self.harness.names.index(name)
                progress.update(task, completed=done, description=f"harness {name}")

        try:
            return self.harness(model, self.tokenizer, on_task)
        finally:
            if progress is not None:
                progress.remove_task(task)

    def _generate(self, model: "PreTrainedModel", progress: "Progress | None") -> dict:
        from graftlm.curate.langid import make_identifier
        from graftlm.evaluate.generate import continuations, language_rates

        config = self.config.generate
        identify = make_identifier(config.language_id.curation())
        results = {}
        for lang, prompt_set in self.prompts.items():
            with self._part(progress, f"generate {lang}") as on_batch:
                generated = continuations(model, prompt_set, self.start_id, self.pad_id, self.tokenizer.eos_token_id,
                                          config.max_new_tokens, self.config.batch_size, on_batch)
            results[lang] = language_rates(prompt_set, generated, self.tokenizer, identify)
        return results

    def _lens(self, model: "PreTrainedModel", progress: "Progress | None", max_length: int) -> dict:
        from graftlm.evaluate.lens import logit_lens

        results = {}
        for lang, text_set in self.lens_text.items():
            with self._part(progress, f"lens {lang}") as on_batch:
                result = logit_lens(model, text_set, self.token_languages, self.start_id, self.pad_id, max_length,
                                    self.config.batch_size, self.config.dtype, on_batch)
            result["target"] = self.target
            result["target_share"] = result["shares"].get(self.target) if self.target else None
            result["english_share"] = result["shares"].get(ENGLISH)
            results[lang] = result
        return results


def evaluate_model(model_spec: str, config: EvalConfig, show_progress: bool = True, target: str | None = None,
                   languages: dict[str, str] | None = None) -> dict:
    """`graft eval`: load a model (anything `base_model:` accepts) and run every evaluation of `config` in full
    (token languages for the lens from the lens texts; `target`: see Evaluator.from_config)."""
    from graftlm.models import load_model, load_tokenizer
    from graftlm.progress import log, steps_progress

    tokenizer = load_tokenizer(model_spec)
    evaluator = Evaluator.from_config(config, tokenizer, target=target, languages=languages)
    for name, encoded_set in evaluator.choice.items():
        if encoded_set.choice_set.format == "xcopa":
            log(f"eval: {name}: XCOPA, connectives in '{encoded_set.choice_set.lang}'")
    if evaluator.harness is not None:
        log(f"eval: lm-eval tasks {', '.join(evaluator.harness.names)} (tasks in {evaluator.harness.tasks_dir})")
        evaluator.harness.check()
    if evaluator.lens_text:
        languages = evaluator.token_languages
        owned = ", ".join(f"{lang} {int((languages.owner == i).sum()):,}" for i, lang in enumerate(languages.languages))
        log(f"eval: lens: token languages from the lens texts ({owned} tokens); target '{evaluator.target}'")
    model = load_model(model_spec)
    if not show_progress:
        return evaluator(model, full=True)
    with steps_progress() as progress:
        return evaluator(model, full=True, progress=progress)


def results_table(results: dict) -> "Group":
    """The results of an evaluation for the terminal: a table of text sets, a table of choice sets."""
    from rich.console import Group
    from rich.table import Table

    def table(*columns: str) -> "Table":
        made = Table(show_edge=False)
        made.add_column(columns[0], overflow="fold")  # set names are often long paths
        for column in columns[1:]:
            made.add_column(column, justify="right", no_wrap=True)
        return made

    tables = []
    if results["text"]:
        text = table("text", "bits/byte", "tokens/byte", "tokens/word or /char", "documents")
        for name, r in results["text"].items():
            per_unit, unit = fertility(r)
            text.add_row(name, f"{r['bpb']:.4f}", f"{r['tokens_per_byte']:.4f}",
                         f"{per_unit:.3f} /{'word' if unit == 'word' else 'char'}", str(r["documents"]))
        tables.append(text)
    if results["choice"]:
        choice = table("choice", "accuracy", "95% CI", "acc/byte", "n")
        for name, r in results["choice"].items():
            low, high = r["ci95"]
            choice.add_row(name, f"{r['accuracy']:.3f}", f"{low:.3f}-{high:.3f}", f"{r['accuracy_norm']:.3f}",
                           str(r["n"]))
        tables.append(choice)
    if results.get("harness"):
        harness = table("lm-eval task", "metric", "value", "stderr", "n")
        for name, r in results["harness"].items():
            for metric, value in harness_metrics(r):
                stderr = r.get(f"{metric}_stderr")
                harness.add_row(name, metric, f"{value:.4f}", "-" if stderr is None else f"±{stderr:.4f}",
                                str(r.get("n", "")))
        tables.append(harness)
    if results.get("generate"):
        generate = table("prompts", "same language", "mixed", "distinct-1", "distinct-2", "n", "languages")
        last = generate.columns[-1]
        last.no_wrap, last.overflow, last.justify = False, "fold", "left"
        for lang, r in results["generate"].items():
            languages = ", ".join(f"{code} {count}" for code, count in r["languages"].items())
            generate.add_row(lang, f"{r['same_language']:.0%}", f"{r['mixed']:.0%}", _maybe(r["distinct_1"]),
                             _maybe(r["distinct_2"]), str(r["n"]), languages)
        tables.append(generate)
    for lang, r in (results.get("lens") or {}).items():
        columns = ["bits/byte", *(f"{code} share" for code in r["shares"])]
        lens = table(f"lens {lang}: layer", *columns)
        for i, layer in enumerate(r["layers"]):
            lens.add_row(str(layer), f"{r['bpb'][i]:.3f}", *(f"{shares[i]:.1%}" for shares in r["shares"].values()))
        tables.append(lens)
    return Group(*tables)


HARNESS_SKIPPED = ("n", "task", "lang", "path")


def harness_metrics(result: dict) -> list[tuple[str, float]]:
    """The (metric, value) pairs of one lm-eval task's result, without stderrs and bookkeeping."""
    return [(key, value) for key, value in result.items()
            if key not in HARNESS_SKIPPED and not key.endswith("_stderr") and isinstance(value, (int, float))]


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
