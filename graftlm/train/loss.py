"""Next-token loss of a causal language model, with an output layer that never materialises all the logits.

SmolLM2's output layer has 49k rows: for a micro-batch of 2k tokens its fp32 logits alone take 400 MB, and the
standard path keeps them (and their softmax) alive until the backward pass. The chunked loss computes, for a chunk
of tokens at a time, the logits, the cross-entropy and at once its gradients with respect to the hidden states and
the output weight; the backward pass only scales them. Peak memory for the head drops to one chunk's logits.

An extra per-token term on the same logits (distillation, graftlm/train/distill.py) rides along chunk by chunk, so
it costs no second pass through the output layer.

`train.loss_vocab_chunk` also slices the vocabulary of the two products whose output has a vocabulary dimension
(the logits, grad_weight): each number is the same dot product, only the shape of the products changes.
`train.loss: liger` hands the output layer and cross-entropy to Liger Kernel's fused CUDA kernel instead.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.errors import GraftError

IGNORE = -100
SOFTMAX_ROWS = 32
"""Rows of logits whose softmax is computed together: 32 × a 49k vocabulary in fp32 is 6 MB, within a CPU's cache.
(Zen 4, 1,024 tokens × 49,152: 223 ms for the loss with its 172 ms product, against 381 ms for the whole chunk's
softmax at once.)"""


class ChunkTerm(Protocol):
    """A term added to the cross-entropy of some tokens, computed from the student's fp32 logits of a chunk."""

    total: torch.Tensor
    """The term summed over every token so far (divided by the valid-token count with the cross-entropy)."""

    def __call__(self, logits: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For the chunk whose first token is `start`: (row indices within the chunk, d term / d logits of those
        rows), having added the rows' term to `total`; None when no row of the chunk has the term."""


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid targets of cross_entropy(hidden @ weight.T, targets) (+ `extra`'s term), computed `chunk`
    tokens at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype, extra: ChunkTerm | None = None,
                vocab_chunk: int | None = None, weight_cast: torch.Tensor | None = None) -> torch.Tensor:
        """`weight_cast`: `weight` already in `compute_dtype` (cast once for a step's micro-batches), or None."""
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly below
            return ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk, compute_dtype, extra,
                                                      vocab_chunk, weight_cast)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk, compute_dtype, extra, vocab_chunk, weight_cast) -> torch.Tensor:
        valid_count = (targets != IGNORE).sum().clamp(min=1)
        w = weight.to(compute_dtype) if weight_cast is None else weight_cast
        # Vocabulary slices of the products that keep the vocabulary as an output dimension (each logit and each
        # row of grad_weight is the same dot product, so the numbers do not change): a 49k-wide product runs well
        # below the matmul rate on CPU. grad_hidden sums over the vocabulary and stays one product.
        vocab_slices = [slice(0, w.shape[0])] if vocab_chunk is None else \
            [slice(v, v + vocab_chunk) for v in range(0, w.shape[0], vocab_chunk)]
        one_chunk = hidden.shape[0] <= chunk  # grad_weight is then written once, not summed into zeros
        grad_hidden = torch.empty_like(hidden)
        grad_weight = (torch.empty if one_chunk else torch.zeros)(weight.shape, dtype=torch.float32,
                                                                   device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            valid = t != IGNORE
            t_safe = t.clamp(min=0)
            if len(vocab_slices) == 1:
                logits = h @ w.T
            else:
                logits = torch.empty((len(h), w.shape[0]), dtype=compute_dtype, device=h.device)
                for v in vocab_slices:
                    logits[:, v] = h @ w[v].T
            scale = valid.to(torch.float32) / valid_count
            token_loss = torch.empty(len(h), dtype=torch.float32, device=h.device)
            # the logits become d(mean loss)/d(logits) = (softmax - onehot) / valid_count (zero on ignored
            # positions) in place, SOFTMAX_ROWS rows at a time in fp32: a block's fp32 copy stays in cache, where
            # the whole chunk's would make every elementwise pass a trip through memory
            for r in range(0, len(h), SOFTMAX_ROWS):
                rows = slice(r, r + SOFTMAX_ROWS)
                x = logits[rows].float()  # the block itself when the logits are fp32
                target = t_safe[rows, None]
                extra_grad = extra(x, start + r) if extra is not None else None  # before x is overwritten
                target_logit = x.gather(1, target).squeeze(1)
                top = x.amax(dim=-1, keepdim=True)
                sums = x.sub_(top).exp_().sum(dim=-1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                token_loss[rows] = (lse - target_logit) * valid[rows]
                x.div_(sums)
                x[torch.arange(len(x), device=x.device), target.squeeze(1)] -= 1.0
                if extra_grad is not None:
                    extra_rows, grad = extra_grad
                    x[extra_rows] += grad
                x.mul_(scale[rows, None])
                if logits.dtype != torch.float32:
                    logits[rows] = x
            total += token_loss.sum()
            grad_logits = logits  # the same tensor: the loop above wrote each row's gradient over its logits
            grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
            for v in vocab_slices:
                if one_chunk:
                    grad_weight[v] = grad_logits[:, v].T @ h  # (to fp32 on assignment)
                else:
                    grad_weight[v] += (grad_logits[:, v].T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        if extra is not None:
            total = total + extra.total
        return total / valid_count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: the buffers are this call's own (a second backward through them fails on their version)
        return grad_hidden.mul_(grad_output), grad_weight.mul_(grad_output), None, None, None, None, None, None


class CausalLMLoss(nn.Module):
    """Wraps a Hugging Face causal LM so that `forward(inputs, targets)` returns the mean next-token loss.

    With a `distiller` (graftlm/train/distill.py), `forward(inputs, targets, replay=mask)` adds its KL term on the
    sequences the boolean mask marks; the term's share of the returned loss is left in `self.distill_part`.
    The wrapper is what DDP (accelerate) wraps, so gradient synchronisation sees the whole computation.
    `liger`: the output layer and cross-entropy are Liger Kernel's fused CUDA kernel (`liger_loss`)."""

    def __init__(self, model: nn.Module, chunked: bool = True, chunk_tokens: int = 1024, distiller=None,
                 vocab_chunk: int | None = None, liger: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.chunk_tokens = chunk_tokens
        self.vocab_chunk = vocab_chunk
        self.distiller = distiller  # a plain object: the teacher's weights stay out of this module (and of DDP)
        self.liger = liger
        if liger is not None and distiller is not None:
            raise GraftError("train.loss: liger cannot add the distillation term; use loss: chunked")
        self.distill_part: torch.Tensor | None = None
        self._step_casts: dict[torch.dtype, torch.Tensor] | None = None
        """Inside `casts_per_step()`: the output weight cast to each compute dtype, by the step's first
        micro-batch."""

    @contextlib.contextmanager
    def casts_per_step(self):
        """Inside: the chunked loss casts the output weight to the compute dtype once and reuses it in every
        micro-batch (the weights do not change between them). The loss computes with autocast off, where autocast's
        own cast cache (train/speed.py's `weight_casts_per_step`) does not reach: without this, a 49k-row head is
        cast again for each micro-batch (48 ms on 2 Zen 4 cores)."""
        self._step_casts = {}
        try:
            yield
        finally:
            self._step_casts = None

    @classmethod
    def from_config(cls, model: nn.Module, cfg, device: torch.device, distiller=None) -> "CausalLMLoss":
        """The loss `train.loss` and `train.loss_vocab_chunk` (graftlm/train/config.py) ask for."""
        return cls(model, chunked=cfg.loss != "standard", distiller=distiller, vocab_chunk=cfg.loss_vocab_chunk,
                   liger=liger_loss(device) if cfg.loss == "liger" else None)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, replay: torch.Tensor | None = None) -> torch.Tensor:
        self.distill_part = None
        head = self.model.get_output_embeddings()
        if self.liger is not None:
            hidden = self.model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state
            loss = self.liger(head.weight, hidden.flatten(0, 1), targets.flatten(), getattr(head, "bias", None))
            return loss[0] if isinstance(loss, tuple) else loss  # (loss, z_loss) in some Liger versions
        distill = self.distiller is not None and replay is not None and bool(replay.any())
        teacher = self.distiller.teacher_hidden(inputs, replay) if distill else None
        if not self.chunked or getattr(head, "bias", None) is not None:
            logits = self.model(input_ids=inputs, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
            if distill:
                valid_count = (targets != IGNORE).sum().clamp(min=1)
                term = self.distiller.direct_term(logits, teacher, targets, replay) / valid_count
                self.distill_part = term.detach()
                loss = loss + term
            return loss
        # no key/value cache: training never decodes (and a compiled block would recompile for each layer's cache)
        hidden = self.model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
        # peft's wrappers of a trainable head (trainable tokens, modules_to_save) answer `.weight` with the
        # weight their forward uses
        extra = self.distiller.chunk_term(teacher, targets, replay) if distill else None
        weight_cast = None
        if self._step_casts is not None and head.weight.dtype != compute_dtype:
            if compute_dtype not in self._step_casts:
                self._step_casts[compute_dtype] = head.weight.detach().to(compute_dtype)
            weight_cast = self._step_casts[compute_dtype]
        loss = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                               self.chunk_tokens, compute_dtype, extra, self.vocab_chunk, weight_cast)
        if extra is not None:
            self.distill_part = (extra.total / (targets != IGNORE).sum().clamp(min=1)).detach()
        return loss


def liger_loss(device: torch.device) -> nn.Module:
    """Liger Kernel's fused linear cross-entropy (Triton kernels: CUDA only), ignoring IGNORE targets."""
    if device.type != "cuda":
        raise GraftError(f"train.loss: liger runs on CUDA only, and this run is on {device.type}; "
                         "use loss: chunked (the same computation in plain torch)")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise GraftError("train.loss: liger needs Liger Kernel, which is not installed: "
                         "pip install 'graftlm[gpu]' (or pip install liger-kernel)") from None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
