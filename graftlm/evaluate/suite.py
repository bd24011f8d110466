"""All of a recipe's evaluation sets, loaded and tokenised once, scored against a model in one call.

    evaluator = Evaluator.from_config(recipe.eval, tokenizer)
    results = evaluator(model)             # the during-training subsets (eval.max_documents / eval.max_items)
    results = evaluator(model, full=True)  # every document and item
    # {"text": {"vi": {"bpb", "tokens_per_byte", "tokens_per_word", "documents"}},   (zh: tokens_per_character)
    #  "choice": {"xcopa_vi": {"accuracy", "accuracy_norm", "ci95", "n"}}}

`graft eval` builds the same object from its options (the set names are then the file paths), so the numbers
printed by `graft eval --json` and those written during training come from one code path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from graftlm.evaluate.bpb import TextSet, bits_per_byte, fertility, load_text_set
from graftlm.evaluate.choice import ChoiceSet, EncodedChoice, choice_accuracy, encode_item, load_choice_set
from graftlm.evaluate.config import EvalConfig
from graftlm.evaluate.scoring import context_length, pad_token_id, start_token_id

if TYPE_CHECKING:
    from rich.console import Group
    from rich.progress import Progress
    from rich.table import Table
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class _EncodedChoiceSet:
    choice_set: ChoiceSet
    encoded: list[list[EncodedChoice]]


class Evaluator:
    def __init__(self, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase", text: dict[str, TextSet],
                 choice: dict[str, ChoiceSet]):
        self.config = config
        self.start_id = start_token_id(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.text = text
        self.choice = {name: _EncodedChoiceSet(s, [encode_item(item, tokenizer) for item in s.items])
                       for name, s in choice.items()}

    @classmethod
    def for_recipe(cls, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase") -> "Evaluator | None":
        """The evaluator of a recipe's `eval:` section; None when the section names no set."""
        if not (config.text or config.choice):
            return None
        return cls.from_config(config, tokenizer)

    @classmethod
    def from_config(cls, config: EvalConfig, tokenizer: "PreTrainedTokenizerBase",
                    languages: dict[str, str] | None = None) -> "Evaluator":
        """Read and tokenise every set of `config` (a bad file fails here, before any model work). A text set's
        language is `languages[name]`, else its name (`vi`, `zh`): it decides what fertility counts."""
        languages = languages or {}
        text = {name: load_text_set(path, tokenizer, config.text_field, lang=languages.get(name, name))
                for name, path in config.text.items()}
        choice = {name: load_choice_set(c.path, c.format, c.lang) for name, c in config.choice.items()}
        return cls(config, tokenizer, text, choice)

    def __call__(self, model: "PreTrainedModel", full: bool = False, progress: "Progress | None" = None) -> dict:
        """Score every set; `full=False` scores the first eval.max_documents / eval.max_items of each.

        Runs under torch.no_grad in eval mode and puts the model back in the mode it was in.
        """
        config = self.config
        max_length = context_length(model, config.max_length)
        settings = dict(start_id=self.start_id, pad_id=self.pad_id, max_length=max_length,
                        batch_size=config.batch_size, dtype=config.dtype)
        results: dict = {"text": {}, "choice": {}}
        for name, text_set in self.text.items():
            subset = text_set.head(None if full else config.max_documents)
            with _bar(progress, f"bpb {name}") as on_batch:
                results["text"][name] = bits_per_byte(model, subset, **settings, on_batch=on_batch)
        for name, encoded_set in self.choice.items():
            count = len(encoded_set.encoded) if full or config.max_items is None else config.max_items
            labels = [item.label for item in encoded_set.choice_set.items[:count]]
            with _bar(progress, f"choice {name}") as on_batch:
                results["choice"][name] = choice_accuracy(model, encoded_set.encoded[:count], labels, **settings,
                                                          on_batch=on_batch)
        return results


@contextlib.contextmanager
def _bar(progress: "Progress | None", description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for one set while it is scored (removed after, so that evaluations during training do not
    pile up bars); None without a Progress."""
    if progress is None:
        yield None
        return
    task = progress.add_task(description, total=None, status="")
    try:
        yield lambda done, total: progress.update(task, completed=done, total=total)
    finally:
        progress.remove_task(task)


def evaluate_model(model_spec: str, config: EvalConfig, show_progress: bool = True,
                   languages: dict[str, str] | None = None) -> dict:
    """`graft eval`: load a model (anything `base_model:` accepts) and score every set of `config` in full."""
    from graftlm.models import load_model, load_tokenizer
    from graftlm.progress import log, steps_progress

    tokenizer = load_tokenizer(model_spec)
    evaluator = Evaluator.from_config(config, tokenizer, languages)
    for name, encoded_set in evaluator.choice.items():
        if encoded_set.choice_set.format == "xcopa":
            log(f"eval: {name}: XCOPA, connectives in '{encoded_set.choice_set.lang}'")
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
    return Group(*tables)
