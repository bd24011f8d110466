"""The one place graftlm asks a model for log-likelihoods: batches of token spans, each scored from a given index.

Bits per byte (documents, cut into windows) and multiple choice (a continuation after its context) are both
"the sum of log p(token | tokens before it) over part of a sequence", so both come here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from graftlm.errors import GraftError
from graftlm.precision import eval_dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "auto")
BATCH_TOKENS = 4096
"""Most tokens in one forward pass: the float32 logits of 4096 tokens over a 49k vocabulary are 0.8 GB."""
MIN_FILL = 0.9
"""A batch only holds spans at least this fraction as long as its longest one."""
MAX_LENGTH_CAP = 2048
"""Default context when none is given: the model's own, but no longer than this (long contexts are slow on CPU)."""
SCORE_ROWS = 32
"""Rows of logits taken to float32 together: 32 × a 49k vocabulary is 6 MB, within a CPU's cache, where a whole
batch's float32 copy makes every pass of the logsumexp a trip through memory."""


@dataclass(frozen=True)
class Span:
    """Tokens fed to the model; the log-probabilities of `ids[first:]` count (`first` >= 1: the first token of a
    span is only ever context)."""

    ids: list[int]
    first: int


def start_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The token every scored document starts from: BOS, or EOS where the tokenizer has no BOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise GraftError("eval: the tokenizer has neither a BOS nor an EOS token to start sequences from")


def pad_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """Any id will do: padding follows every real token of its row (which causal attention never lets see it) and
    is never scored."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return token_id
    return 0


def context_length(model: "PreTrainedModel", max_length: int | None) -> int:
    """The longest span the model sees: the given one, else the model's own context capped at MAX_LENGTH_CAP."""
    if max_length is not None:
        return max_length
    own = getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH_CAP
    return min(own, MAX_LENGTH_CAP)


def log_likelihoods(model: "PreTrainedModel", spans: Sequence[Span], pad_id: int, batch_size: int = 16,
                    dtype: str = "float32", on_batch: Callable[[int, int], None] | None = None) -> list[float]:
    """For each span, the sum of the natural-log probabilities of `ids[first:]`, each given the tokens before it.

    Spans are sorted by length so that batches hold similar lengths, and right-padded: padding only ever follows a
    row's real tokens, so with causal attention the real tokens neither see it nor change position (position ids
    are 0..n-1 in every row). Runs under no_grad in eval mode; the model's mode is restored.
    `on_batch(done, total)` is called after each batch with the spans scored so far (for a progress bar).
    """
    import torch

    results = [0.0] * len(spans)
    device = next(model.parameters()).device
    order = sorted(range(len(spans)), key=lambda i: len(spans[i].ids), reverse=True)
    done = 0
    with torch.no_grad(), eval_mode(model), precision(dtype, device):
        for rows in span_batches(order, spans, batch_size):
            for i, total in zip(rows, _score_batch(model, [spans[i] for i in rows], pad_id, device)):
                results[i] = total
            done += len(rows)
            if on_batch is not None:
                on_batch(done, len(spans))
    return results


def span_batches(order: list[int], spans: Sequence[Span], batch_size: int) -> Iterator[list[int]]:
    """Consecutive spans (longest first): at most `batch_size` of them, BATCH_TOKENS padded tokens, and none
    shorter than MIN_FILL of the batch's longest. On a CPU a bigger batch is barely faster per token, so padding
    is pure loss: without the MIN_FILL rule a 40-sentence subset spends a quarter of its time on it."""
    at = 0
    while at < len(order):
        width = len(spans[order[at]].ids)
        count = max(1, min(batch_size, BATCH_TOKENS // max(width, 1)))
        end = at + 1
        while end < min(at + count, len(order)) and len(spans[order[end]].ids) >= MIN_FILL * width:
            end += 1
        yield order[at:end]
        at = end


@dataclass(frozen=True)
class Batch:
    """Spans as model inputs, right-padded. `where[:, t]` marks the positions t whose logits predict a scored
    token, `targets` those tokens (in row-major order).

    No attention mask: padding only follows each row's real tokens, so under causal attention no real token sees
    it, and without a mask attention runs on its fastest kernel."""

    inputs: dict
    where: "torch.Tensor"
    targets: "torch.Tensor"


def batch_inputs(batch: Sequence[Span], pad_id: int, device: "torch.device") -> Batch:
    import torch

    width = max(len(span.ids) for span in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, span in enumerate(batch):
        input_ids[row, :len(span.ids)] = torch.tensor(span.ids, dtype=torch.long)
        scored[row, span.first:len(span.ids)] = True
    position_ids = torch.arange(width).expand(len(batch), -1)
    # The logits at position t predict token t + 1.
    where = scored[:, 1:].to(device)
    inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
    return Batch(inputs, where, input_ids[:, 1:].to(device)[where])


def _score_batch(model: "PreTrainedModel", batch: list[Span], pad_id: int, device: "torch.device") -> list[float]:
    """The spans' scores from one forward pass. Only the positions some row scores go through the output layer
    (`logits_to_keep`, where the model takes it: a choice's context costs no vocabulary-wide product), and a token's
    log-probability is its logit minus the logsumexp of its row, never a full log-softmax."""
    import torch

    inputs = batch_inputs(batch, pad_id, device)
    accepted = _forward_parameters(model)
    extra = {"use_cache": False} if "use_cache" in accepted else {}
    if "logits_to_keep" in accepted:
        kept = inputs.where.any(0).nonzero()[:, 0]  # positions scored in any row
        logits = model(**inputs.inputs, logits_to_keep=kept, **extra).logits
        chosen = logits[inputs.where[:, kept]]
    else:
        logits = model(**inputs.inputs, **extra).logits
        chosen = logits[:, :-1][inputs.where]
    token_log_probs = target_log_probs(chosen, inputs.targets)
    rows = inputs.where.nonzero()[:, 0]
    return torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, token_log_probs).tolist()


def target_log_probs(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """log p(target) of each row of `logits` (tokens × vocabulary), in float64: the target's logit minus the row's
    logsumexp, in float32 SCORE_ROWS rows at a time (row by row the same numbers as the whole at once)."""
    import torch

    scores = torch.empty(len(logits), dtype=torch.float64, device=logits.device)
    for start in range(0, len(logits), SCORE_ROWS):
        rows = logits[start:start + SCORE_ROWS].float()
        target = targets[start:start + SCORE_ROWS].unsqueeze(-1)
        scores[start:start + SCORE_ROWS] = rows.gather(-1, target).squeeze(-1) - torch.logsumexp(rows, -1)
    return scores


def _forward_parameters(model: "PreTrainedModel") -> set[str]:
    """The keyword arguments of the model's forward. Most transformers causal LMs take `logits_to_keep` (logits
    only at given positions, through the model's own head: whatever it does after the product, e.g. Gemma's
    softcap, still applies) and `use_cache` (no key/value cache is needed to score)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return set(inspect.signature(base.forward).parameters)


@contextlib.contextmanager
def eval_mode(model: "PreTrainedModel") -> Iterator[None]:
    """The model in eval mode, and torch.compile'd training blocks (train.compile) run eagerly: scoring,
    generation and the lens change shapes batch to batch and token to token, each a recompilation."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.train(was_training)


def precision(dtype: str, device: "torch.device"):
    """float32: the model's own weights, any surrounding autocast switched off; bfloat16: autocast to bf16; auto:
    bfloat16 where it is the faster (graftlm/precision.py)."""
    import torch

    if dtype not in DTYPES:
        raise GraftError(f"eval.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if eval_dtype(dtype, device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
