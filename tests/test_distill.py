"""Distillation on replay: the chunked KL term against a direct computation, and the moving average."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from graftlm.train.config import DistillConfig
from graftlm.train.distill import Distiller, swap_top_with_target
from graftlm.train.ema import EMA
from graftlm.train.loss import IGNORE, CausalLMLoss


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def batch():
    torch.manual_seed(1)
    tokens = torch.randint(0, 300, (4, 12))
    targets = tokens[:, 1:].clone()
    targets[2, 3] = IGNORE
    return tokens[:, :-1], targets, torch.tensor([False, True, True, False])


def direct(student, teacher, inputs, targets, replay, config: DistillConfig) -> torch.Tensor:
    """Cross-entropy over every valid token, plus weight·T²·KL(teacher ‖ student) on the replayed ones."""
    logits = student(input_ids=inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs).logits
    valid = targets != IGNORE
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    s, t, tg = logits[replay].flatten(0, 1), teacher_logits[replay].flatten(0, 1), targets[replay].flatten()
    if config.logit_swap:
        t = swap_top_with_target(t, tg.clamp(min=0))
    temperature = config.temperature
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1)
    term = config.weight * temperature ** 2 * (kl * (tg != IGNORE)).sum()
    return (ce + term) / valid.sum()


def test_the_term_is_zero_when_the_student_is_the_teacher():
    student = tiny_llama(0)
    inputs, targets, replay = batch()
    plain = CausalLMLoss(student, chunk_tokens=7)(inputs, targets)
    loss_module = CausalLMLoss(student, chunk_tokens=7,
                               distiller=Distiller(copy.deepcopy(student), DistillConfig(weight=2.0, temperature=3.0)))
    loss = loss_module(inputs, targets, replay=replay)
    assert loss_module.distill_part.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("logit_swap", [False, True])
def test_the_term_and_its_gradient_match_a_direct_kl(chunked, logit_swap):
    student, teacher = tiny_llama(0), tiny_llama(1)
    config = DistillConfig(weight=0.7, temperature=2.0, logit_swap=logit_swap)
    inputs, targets, replay = batch()
    loss_module = CausalLMLoss(student, chunked=chunked, chunk_tokens=7, distiller=Distiller(teacher, config))
    loss = loss_module(inputs, targets, replay=replay)
    (loss * 3).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    expected = direct(student, teacher, inputs, targets, replay, config)
    (expected * 3).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_module.distill_part.item() > 1e-4  # random tiny models: nearly uniform, a small KL
    for name, p in student.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


def test_no_replayed_sequence_means_no_term():
    student = tiny_llama(0)
    inputs, targets, _ = batch()
    loss_module = CausalLMLoss(student, distiller=Distiller(tiny_llama(1), DistillConfig()))
    loss = loss_module(inputs, targets, replay=torch.zeros(4, dtype=torch.bool))
    assert loss_module.distill_part is None
    assert loss.item() == pytest.approx(CausalLMLoss(student)(inputs, targets).item(), abs=1e-6)


def test_logit_swap_puts_the_target_first_and_keeps_the_rest():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.5], [3.0, 1.0, 0.0, 2.0]])
    swapped = swap_top_with_target(logits, torch.tensor([2, 0]))
    assert swapped.tolist() == [[1.0, 2.0, 5.0, 0.5], [3.0, 1.0, 0.0, 2.0]]  # row 2's target is already first


def test_ema_math_swap_and_save(tmp_path):
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[0.0]]))
    ema = EMA([("a", a), ("b", b)], decay=0.9)
    shadow_a, shadow_b = a.detach().clone(), b.detach().clone()
    for step in range(3):
        with torch.no_grad():
            a.add_(1.0)
            b.sub_(2.0)
        ema.update()
        shadow_a = 0.9 * shadow_a + 0.1 * a.detach()
        shadow_b = 0.9 * shadow_b + 0.1 * b.detach()
    assert torch.allclose(ema.shadow[0], shadow_a) and torch.allclose(ema.shadow[1], shadow_b)
    own = a.detach().clone()
    with ema.applied():
        assert torch.equal(a.detach(), ema.shadow[0])
    assert torch.equal(a.detach(), own)
    ema.save(tmp_path)
    other = EMA([("a", a), ("b", b)], decay=0.9)
    other.load(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(other.shadow, ema.shadow))


def test_ema_leaves_a_weight_that_does_not_move_exactly_as_it_is():
    w = torch.nn.Parameter(torch.randn(5, 3))
    ema = EMA([("w", w)], decay=0.999)
    for _ in range(10):
        ema.update()
    assert torch.equal(ema.shadow[0], w.detach())
