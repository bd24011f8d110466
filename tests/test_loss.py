import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from graftlm.train.loss import IGNORE, CausalLMLoss, ChunkedLinearCrossEntropy


def test_chunked_cross_entropy_matches_the_standard_one():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[5] = IGNORE
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8, torch.float32)
    (loss * 3).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = F.cross_entropy(h2 @ w2.T, targets, ignore_index=IGNORE)
    (expected * 3).backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-5) and torch.allclose(weight.grad, w2.grad, atol=1e-5)


def test_wrapper_gives_the_models_own_loss_and_gradients():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, 300, (3, 17))
    chunked = CausalLMLoss(model, chunked=True, chunk_tokens=10)(tokens[:, :-1], tokens[:, 1:])
    chunked.backward()
    grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    reference = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts the labels itself
    reference_std = CausalLMLoss(model, chunked=False)(tokens[:, :-1], tokens[:, 1:])
    reference_std.backward()
    assert torch.allclose(chunked, reference_std, atol=1e-5)
    assert torch.allclose(grad, model.get_input_embeddings().weight.grad, atol=1e-5)
    assert reference.shape == ()


def test_chunked_loss_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 32), torch.randn(500, 32) * 0.1
    targets = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 16, torch.bfloat16)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - F.cross_entropy(hidden @ weight.T, targets).item()) < 0.02
