"""Multiple choice by log-likelihood: the model picks the continuation it finds most probable after the context.

Two ways to pick, both reported: the largest sum of log-probabilities (`accuracy`, what lm-evaluation-harness
calls acc) and the largest log-probability per UTF-8 byte of the continuation (`accuracy_norm`, which does not
favour short answers). Formats (.jsonl):
- XCOPA: `{premise, choice1, choice2, question: cause|effect, label}`, turned into text the way
  lm-evaluation-harness's xcopa task does: "<premise without its final period> <connective>" then " <choice with a
  lowercased first letter>", the connective ("because"/"therefore", "bởi vì"/"vì vậy", ...) in the set's language.
- generic: `{context, choices: [..], label}`, each choice scored as " <choice>" after the context (Belebele-style
  sets converted to this drop in).
Unlike a bits-per-byte document, a choice sequence starts with its context, not a BOS token (see `choice_span`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from graftlm.data.read import read_json_objects
from graftlm.errors import DataError
from graftlm.evaluate.scoring import Span, log_likelihoods
from graftlm.languages import label_language, normalize_language

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ChoiceFormat = Literal["auto", "xcopa", "generic"]

XCOPA_CONNECTIVES = {
    "en": ("because", "therefore"),
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"),
    "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
    "zh": ("因为", "所以"),
}
"""(cause, effect) connectives per language (canonical codes, graftlm/languages.py), as in lm-evaluation-harness
(English as in its COPA task)."""
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: list[str]
    """Each choice as written in the file (XCOPA: with its first letter lowercased)."""
    label: int


@dataclass(frozen=True)
class ChoiceSet:
    path: str
    format: str
    lang: str | None
    """The connective language (XCOPA only)."""
    items: list[ChoiceItem]


def load_choice_set(path: str, format: ChoiceFormat = "auto", lang: str | None = None) -> ChoiceSet:
    """Read a choice set; `lang` (XCOPA) is detected from the premises when not given."""
    records = list(read_json_objects(path))
    if not records:
        raise DataError(f"{path}: no items")
    if format == "auto":
        format = _detect_format(path, *records[0])
    lang = normalize_language(lang) if lang is not None else None
    if format == "generic":
        return ChoiceSet(path, format, lang, [_generic_item(path, line, obj) for line, obj in records])
    if lang is None:
        lang = _detect_language(path, [str(obj.get("premise", "")) for _, obj in records[:100]])
    if lang not in XCOPA_CONNECTIVES:
        raise DataError(f"{path}: no XCOPA connectives for language '{lang}' "
                        f"(known: {', '.join(sorted(XCOPA_CONNECTIVES))})")
    return ChoiceSet(path, format, lang, [_xcopa_item(path, line, obj, lang) for line, obj in records])


def _detect_format(path: str, line: int, first: dict) -> str:
    if "premise" in first:
        return "xcopa"
    if "choices" in first:
        return "generic"
    raise DataError(f"{path}:{line}: neither an XCOPA item (premise, choice1, choice2, question, label) nor a generic "
                    f"one (context, choices, label); fields: {', '.join(first) or 'none'}")


def _detect_language(path: str, premises: list[str]) -> str:
    import py3langid

    label, _ = py3langid.classify(" ".join(premises))
    lang = label_language(label)
    if lang not in XCOPA_CONNECTIVES:
        raise DataError(f"{path}: the premises look like language '{lang}', which has no XCOPA connectives; "
                        f"name the language (--lang, or `lang:` in the recipe): {', '.join(sorted(XCOPA_CONNECTIVES))}")
    return lang


def _field(path: str, line: int, obj: dict, key: str, kind: type):
    if key not in obj:
        raise DataError(f"{path}:{line}: no field '{key}' (fields: {', '.join(obj) or 'none'})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}:{line}: field '{key}' is {type(value).__name__}, expected {kind.__name__}")
    return value


def _checked_label(path: str, line: int, obj: dict, choices: int) -> int:
    label = _field(path, line, obj, "label", int)
    if not 0 <= label < choices:
        raise DataError(f"{path}:{line}: label {label} is not a choice index (0..{choices - 1})")
    return label


def xcopa_context(premise: str, question: str, lang: str) -> str:
    """"The item was packed in bubble wrap." + cause -> "The item was packed in bubble wrap because"."""
    cause, effect = XCOPA_CONNECTIVES[lang]
    return premise.strip()[:-1] + " " + (cause if question == "cause" else effect)


def xcopa_choice(choice: str) -> str:
    return choice[:1].lower() + choice[1:]


def _xcopa_item(path: str, line: int, obj: dict, lang: str) -> ChoiceItem:
    premise = _field(path, line, obj, "premise", str)
    question = _field(path, line, obj, "question", str)
    if question not in ("cause", "effect"):
        raise DataError(f"{path}:{line}: question must be 'cause' or 'effect', got {question!r}")
    choices = [xcopa_choice(_field(path, line, obj, key, str)) for key in ("choice1", "choice2")]
    return ChoiceItem(xcopa_context(premise, question, lang), choices, _checked_label(path, line, obj, 2))


def _generic_item(path: str, line: int, obj: dict) -> ChoiceItem:
    context = _field(path, line, obj, "context", str)
    choices = _field(path, line, obj, "choices", list)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{path}:{line}: field 'choices' must be a list of at least two strings")
    return ChoiceItem(context, choices, _checked_label(path, line, obj, len(choices)))


# ---- scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedChoice:
    context: list[int]
    continuation: list[int]
    continuation_bytes: int


def encode_item(item: ChoiceItem, tokenizer: "PreTrainedTokenizerBase") -> list[EncodedChoice]:
    """Token ids of the context and of each continuation, split as lm-evaluation-harness splits them: the whole
    text is tokenised once and the continuation is what follows the context's tokens (so a token that straddles
    the boundary is not cut), and whitespace at the end of the context moves to the continuation."""
    context = item.context.rstrip()
    moved = item.context[len(context):]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    encoded = []
    for choice in item.choices:
        continuation = moved + (choice if moved or choice[:1].isspace() else TARGET_DELIMITER + choice)
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        encoded.append(EncodedChoice(context_ids, whole[len(context_ids):], len(continuation.encode("utf-8"))))
    return encoded


def choice_span(start_id: int, choice: EncodedChoice, max_length: int) -> Span:
    """The context and the continuation, cut from the left to fit the context length.

    As in lm-evaluation-harness, no start token goes first (the start token only stands in for an empty context):
    the context is conditioning, never scored. This is what reproduces lm-evaluation-harness's 0.486 on XCOPA-vi
    for SmolLM2-135M-Instruct; starting from its BOS, <|im_start|>, gives 0.518.
    """
    ids = ([*choice.context, *choice.continuation] if choice.context else [start_id, *choice.continuation])
    ids = ids[-max_length:]
    return Span(ids, max(1, len(ids) - len(choice.continuation)))


def choice_accuracy(model: "PreTrainedModel", encoded: list[list[EncodedChoice]], labels: list[int], start_id: int,
                    pad_id: int, max_length: int, batch_size: int = 16, dtype: str = "float32",
                    on_batch: Callable[[int, int], None] | None = None) -> dict:
    """{"accuracy", "accuracy_norm", "ci95", "n"}: ci95 is the Wilson interval [low, high] of `accuracy`."""
    spans = [choice_span(start_id, choice, max_length) for item in encoded for choice in item]
    scores = iter(log_likelihoods(model, spans, pad_id, batch_size, dtype, on_batch))
    correct = correct_norm = 0
    for item, label in zip(encoded, labels):
        item_scores = [next(scores) for _ in item]
        per_byte = [score / max(choice.continuation_bytes, 1) for score, choice in zip(item_scores, item)]
        correct += _argmax(item_scores) == label
        correct_norm += _argmax(per_byte) == label
    n = len(labels)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "ci95": list(wilson_interval(correct, n)),
            "n": n}


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (ties go to the earlier choice, as numpy's argmax does)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion: unlike p ± 1.96·se it stays inside [0, 1] and is honest for
    the small subsets evaluated during training."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))
