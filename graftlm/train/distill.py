"""Distillation on replay: keep the student close to the frozen start model (the teacher) on source-language text.

On every sequence drawn from a replay source, each token adds `weight · T² · KL(p_teacher ‖ p_student)` to its
cross-entropy, both distributions taken at temperature T (Hinton et al. 2015; the T² keeps the gradient's scale
independent of T). The teacher is the start model in bf16; it runs forward only, on the replay sequences only.

Memory: the teacher's weights (2 bytes per parameter) and its last hidden states for the replay sequences of a
micro-batch. Its logits are never held whole: with the chunked loss, the KL rides along the cross-entropy chunk by
chunk (graftlm/train/loss.py) and adds about three chunk-sized fp32 buffers (chunk × vocabulary × 4 bytes) at its
peak; with `train.loss: standard` the replay sequences' full student and teacher logits are held instead.

`logit_swap` is the variant of Mix-CPT (Jiang et al. 2024, logit-swap self-distillation): where the teacher's top
token is not the text's next token, the two logits are exchanged before the softmax, so the target keeps the
teacher's distribution while putting the real next token first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from graftlm.train.config import DistillConfig
from graftlm.train.loss import IGNORE


def swap_top_with_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` (rows × vocabulary) where each row's largest logit and its target's are exchanged."""
    swapped = logits.clone()
    rows = torch.arange(len(logits), device=logits.device)
    top = logits.argmax(dim=-1)
    swapped[rows, top] = logits[rows, targets]
    swapped[rows, targets] = logits[rows, top]
    return swapped


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            config: DistillConfig) -> torch.Tensor:
    """The term per row, `weight · T² · KL(teacher ‖ student)`, differentiable (the standard loss path)."""
    if config.logit_swap:
        teacher_logits = swap_top_with_target(teacher_logits, targets.clamp(min=0))
    t = config.temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  log_target=True, reduction="none").sum(-1)
    return config.weight * t * t * kl


def kl_rows_with_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The term per row and its gradient with respect to the student's logits, `weight · T · (q - p)` (the
    chunked loss path, which computes its own gradients). Inputs are fp32; `student_logits` is overwritten."""
    if config.logit_swap:
        teacher_logits = swap_top_with_target(teacher_logits, targets.clamp(min=0))
    t = config.temperature
    log_q = student_logits.div_(t)
    log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True)
    log_p = teacher_logits.div_(t)
    log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
    p = log_p.exp()
    term = config.weight * t * t * log_p.sub_(log_q).mul_(p).sum(-1)
    grad = log_q.exp_().sub_(p).mul_(config.weight * t)
    return term, grad


class Distiller:
    """The frozen teacher, and the KL term against it for the loss (graftlm/train/loss.py)."""

    def __init__(self, teacher, config: DistillConfig):
        self.teacher = teacher
        self.config = config

    @classmethod
    def load(cls, model_dir: str | Path, config: DistillConfig, device: torch.device,
             trust_remote_code: bool = False) -> "Distiller":
        from graftlm.models import load_model
        from graftlm.precision import fast_bf16

        # bf16 halves the teacher's memory, where the device computes bf16 fast (graftlm/precision.py)
        dtype = torch.bfloat16 if fast_bf16(device.type) else torch.float32
        teacher = load_model(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(teacher.requires_grad_(False).to(device), config)

    @torch.no_grad()
    def teacher_hidden(self, inputs: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states of the replay sequences (replayed sequences × length × width)."""
        return self.teacher.get_decoder()(input_ids=inputs[replay]).last_hidden_state

    @torch.no_grad()
    def teacher_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.teacher.get_output_embeddings()(hidden).float()

    def direct_term(self, logits: torch.Tensor, teacher_hidden: torch.Tensor, targets: torch.Tensor,
                    replay: torch.Tensor) -> torch.Tensor:
        """The term summed over the valid tokens of the replay sequences, from the student's full logits."""
        targets = targets[replay].flatten()
        rows = kl_rows(logits[replay].flatten(0, 1), self.teacher_logits(teacher_hidden).flatten(0, 1), targets,
                       self.config)
        return (rows * (targets != IGNORE)).sum()

    def chunk_term(self, teacher_hidden: torch.Tensor, targets: torch.Tensor, replay: torch.Tensor) -> "ReplayKL":
        return ReplayKL(self, teacher_hidden, targets, replay)


class ReplayKL:
    """The KL term as the chunked loss asks for it (`loss.ChunkTerm`): chunk by chunk of the flattened tokens."""

    def __init__(self, distiller: Distiller, teacher_hidden: torch.Tensor, targets: torch.Tensor,
                 replay: torch.Tensor):
        self.distiller = distiller
        batch, length = targets.shape
        self.teacher_rows = teacher_hidden.flatten(0, 1)
        # each token's row in teacher_rows (the replayed tokens in order), -1 for the tokens of other sequences
        replayed = replay[:, None].expand(batch, length).flatten()
        self.where = torch.full((batch * length,), -1, dtype=torch.long, device=targets.device)
        self.where[replayed] = torch.arange(int(replayed.sum()), device=targets.device)
        self.targets = targets.flatten()
        self.total = torch.zeros((), dtype=torch.float32, device=targets.device)

    def __call__(self, logits: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        where = self.where[start:start + len(logits)]
        rows = (where >= 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return None
        targets = self.targets[start:start + len(logits)][rows]
        teacher = self.distiller.teacher_logits(self.teacher_rows[where[rows]])
        term, grad = kl_rows_with_grad(logits[rows], teacher, targets, self.distiller.config)
        self.total += (term * (targets != IGNORE)).sum()
        return rows, grad
