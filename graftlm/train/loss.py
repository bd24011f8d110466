"""Next-token loss of a causal language model, with an output layer that never materialises all the logits.

SmolLM2's output layer has 49k rows: for a micro-batch of 2k tokens its fp32 logits alone take 400 MB, and the
standard path keeps them (and their softmax) alive until the backward pass. The chunked loss computes, for a chunk
of tokens at a time, the logits, the cross-entropy and at once its gradients with respect to the hidden states and
the output weight; the backward pass only scales them. Peak memory for the head drops to one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid targets of cross_entropy(hidden @ weight.T, targets), computed `chunk` tokens at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly below
            return ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk, compute_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk, compute_dtype) -> torch.Tensor:
        valid_count = (targets != IGNORE).sum().clamp(min=1)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            valid = t != IGNORE
            t_safe = t.clamp(min=0)
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t_safe[:, None]).squeeze(1)) * valid).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / valid_count, zero on ignored positions
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t_safe] -= 1.0
            grad_logits.mul_((valid.to(torch.float32) / valid_count)[:, None])
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
            grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / valid_count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output), None, None, None


class CausalLMLoss(nn.Module):
    """Wraps a Hugging Face causal LM so that `forward(inputs, targets)` returns the mean next-token loss.

    The wrapper is what DDP (accelerate) wraps, so gradient synchronisation sees the whole computation."""

    def __init__(self, model: nn.Module, chunked: bool = True, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.chunk_tokens = chunk_tokens

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if not self.chunked or head.bias is not None:
            logits = self.model(input_ids=inputs).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        hidden = self.model.get_decoder()(input_ids=inputs).last_hidden_state
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else hidden.dtype
        return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                               self.chunk_tokens, compute_dtype)
