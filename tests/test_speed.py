"""The speed switches of `train:` (graftlm/train/speed.py, loss.py): each gives the reference path's numbers, bit
for bit where it claims to, and a clear error where it cannot run."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from graftlm.errors import GraftError
from graftlm.train.config import TrainConfig
from graftlm.train.loss import IGNORE, CausalLMLoss, ChunkedLinearCrossEntropy, liger_loss
from graftlm.train.speed import prepare_for_speed, weight_casts_per_step

CPU = torch.device("cpu")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).train()


def step_gradients(model, loss_module, tokens, per_step_casts: bool, precision: str = "bf16"):
    """One optimizer step's gradients over micro-batches of 2, as the training loop accumulates them."""
    cfg = TrainConfig(precision=precision)
    model.zero_grad(set_to_none=True)
    with contextlib.ExitStack() as casts:
        if per_step_casts:  # as TrainModule does: autocast's casts and the chunked loss's cast of the head
            casts.enter_context(weight_casts_per_step(cfg, CPU))
            casts.enter_context(loss_module.casts_per_step())
        for micro in tokens.split(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_module(micro[:, :-1], micro[:, 1:])
            (loss * 0.5).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("chunked", [True, False])
def test_weight_casts_once_per_step_give_bit_identical_gradients_and_fewer_casts(chunked):
    from torch.profiler import profile

    model = tiny_llama()
    loss_module = CausalLMLoss(model, chunked=chunked, chunk_tokens=16)
    tokens = torch.randint(0, 300, (6, 17))
    counts = []
    for per_step in (False, True):
        with profile() as prof:
            grads = step_gradients(model, loss_module, tokens, per_step)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy"))
        if per_step:
            assert all(torch.equal(a, b) for a, b in zip(reference, grads))
        reference = grads
    # every linear layer's weight, the head's too (cast by autocast, or by the chunked loss itself)
    weights = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert counts[0] - counts[1] == 2 * weights  # three micro-batches: two casts saved per weight


def test_weight_casts_once_per_step_under_lora_are_bit_identical():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # non-zero, so that every factor has a gradient
    loss_module = CausalLMLoss(model, chunk_tokens=16)
    tokens = torch.randint(0, 300, (4, 17))
    reference = step_gradients(model, loss_module, tokens, False)
    assert all(torch.equal(a, b) for a, b in zip(reference, step_gradients(model, loss_module, tokens, True)))


def test_weight_casts_per_step_is_nothing_under_fp32():
    assert isinstance(weight_casts_per_step(TrainConfig(precision="fp32"), CPU), contextlib.nullcontext)


def reference_chunked_cross_entropy(hidden, weight, targets, chunk: int, compute_dtype):
    """The chunked loss written plainly (grad_weight summed into zeros, the whole vocabulary in one product, the
    softmax of all the chunk's rows at once, not in place): loss, grad_hidden, grad_weight of `loss * 0.25`."""
    valid_count = (targets != IGNORE).sum().clamp(min=1)
    w = weight.to(compute_dtype)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros(weight.shape)
    total = torch.zeros(())
    for start in range(0, len(hidden), chunk):
        h, t = hidden[start:start + chunk].to(compute_dtype), targets[start:start + chunk]
        valid, t_safe = t != IGNORE, t.clamp(min=0)
        logits = (h @ w.T).float()
        top = logits.amax(dim=-1, keepdim=True)
        sums = (logits - top).exp().sum(dim=-1, keepdim=True)
        lse = (top + sums.log()).squeeze(1)
        total += ((lse - logits.gather(1, t_safe[:, None]).squeeze(1)) * valid).sum()
        grad_logits = (logits - top).exp() / sums
        grad_logits[torch.arange(len(t)), t_safe] -= 1.0
        grad_logits = grad_logits.mul_((valid.to(torch.float32) / valid_count)[:, None]).to(compute_dtype)
        grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
        grad_weight += (grad_logits.T @ h).float()
    return total / valid_count, grad_hidden * 0.25, grad_weight * 0.25


@pytest.mark.parametrize("tokens", [40, 50])  # one chunk of tokens, several
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_is_bit_identical_to_the_reference(compute_dtype, tokens):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 24, requires_grad=True)
    weight = (torch.randn(1000, 24) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (tokens,))
    targets[7] = IGNORE
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 40, compute_dtype)
    (loss * 0.25).backward()
    expected = reference_chunked_cross_entropy(hidden.detach(), weight.detach(), targets, 40, compute_dtype)
    assert all(torch.equal(a, b) for a, b in zip((loss.detach(), hidden.grad, weight.grad), expected))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_chunks_give_bit_identical_loss_and_gradients(compute_dtype):
    torch.manual_seed(0)
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = (torch.randn(1000, 24) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (50,))
    targets[7] = IGNORE
    results = []
    for vocab_chunk in (None, 256, 320):
        hidden.grad = weight.grad = None
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 16, compute_dtype, None, vocab_chunk)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_loss_from_config_reads_the_switches():
    model = tiny_llama()
    loss = CausalLMLoss.from_config(model, TrainConfig(loss="chunked", loss_vocab_chunk=128), CPU)
    assert loss.chunked and loss.vocab_chunk == 128 and loss.liger is None
    assert not CausalLMLoss.from_config(model, TrainConfig(loss="standard"), CPU).chunked


def test_liger_refuses_a_cpu_run_and_says_how_to_install():
    with pytest.raises(GraftError, match="train.loss: liger runs on CUDA only"):
        CausalLMLoss.from_config(tiny_llama(), TrainConfig(loss="liger"), CPU)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(GraftError, match="pip install"):
            liger_loss(torch.device("cuda"))


def test_liger_and_distillation_is_a_recipe_error():
    with pytest.raises(ValueError, match="liger"):
        TrainConfig(loss="liger", distill={})


def loss_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return CausalLMLoss(model)(tokens[:, :-1], tokens[:, 1:])


@pytest.mark.parametrize("attention", ["eager", "math", "flash", "matmul"])
def test_attention_kernels_give_the_default_loss(attention):
    tokens = torch.randint(0, 300, (2, 33))
    reference = loss_of(tiny_llama(), tokens)
    model = prepare_for_speed(tiny_llama(), TrainConfig(attention=attention), CPU)
    assert model.config._attn_implementation != "sdpa"
    assert torch.allclose(loss_of(model, tokens), reference, rtol=1e-5)
    assert "attn_implementation" not in model.config.to_json_string()  # saved models stay plain


def test_auto_attention_is_matmul_only_in_bf16_on_a_cpu():
    from graftlm.train.speed import auto_attention

    assert auto_attention(TrainConfig(precision="bf16", seq_len=512), CPU) == "matmul"
    assert auto_attention(TrainConfig(precision="bf16", seq_len=2048, batch_tokens=4096), CPU) == "matmul"
    assert auto_attention(TrainConfig(precision="fp32", seq_len=512), CPU) == "sdpa"
    assert auto_attention(TrainConfig(precision="bf16", seq_len=512), torch.device("cuda")) == "sdpa"
    model = prepare_for_speed(tiny_llama(), TrainConfig(precision="bf16", seq_len=512), CPU)
    assert model.config._attn_implementation == "graftlm_matmul"
    prepare_for_speed(model, TrainConfig(precision="fp32"), CPU)  # prepared again: auto follows the new settings
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_llama()
    eager.set_attn_implementation("eager")  # as a model that needs it (soft-capping) sets it for itself
    assert prepare_for_speed(eager, TrainConfig(precision="bf16"), CPU).config._attn_implementation == "eager"


def test_matmul_attention_trains_as_eager():
    tokens = torch.randint(0, 300, (2, 33))
    grads = []
    for attention in ("eager", "matmul"):
        model = prepare_for_speed(tiny_llama(), TrainConfig(attention=attention), CPU)
        CausalLMLoss(model)(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_matmul_attention_without_a_mask_is_causal_only_where_the_module_is():
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from graftlm.train.speed import matmul_attention

    q, k, v = torch.randn(1, 4, 300, 8), torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8)
    causal = torch.full((300, 300), float("-inf")).triu(1)
    for is_causal, mask in ((True, causal), (False, torch.zeros(300, 300))):
        module = SimpleNamespace(num_key_value_groups=2, training=False, is_causal=is_causal)
        expected = eager_attention_forward(module, q, k, v, mask[None, None], scaling=0.3)[0]
        assert torch.allclose(matmul_attention(module, q, k, v, None, scaling=0.3)[0], expected, atol=1e-5)


def test_matmul_attention_with_padding_gives_eager_logits_and_no_nan():
    tokens = torch.randint(1, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the padded queries have no key to look at
    logits = []
    for attention in ("eager", "matmul"):
        model = prepare_for_speed(tiny_llama(), TrainConfig(attention=attention), CPU).eval()
        with torch.no_grad():
            logits.append(model(input_ids=tokens, attention_mask=mask).logits)
    assert torch.isfinite(logits[1]).all()
    assert torch.allclose(logits[0][mask.bool()], logits[1][mask.bool()], atol=1e-5)


def test_matmul_attention_generates_as_eager_with_a_cache_and_left_padding():
    prompts = torch.randint(1, 300, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    outputs = []
    for attention in ("eager", "matmul"):
        model = prepare_for_speed(tiny_llama(), TrainConfig(attention=attention), CPU).eval()
        outputs.append(model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0))
    assert torch.equal(*outputs)


def test_cuda_only_attention_kernels_are_refused_on_cpu():
    with pytest.raises(GraftError, match="train.attention: efficient"):
        prepare_for_speed(tiny_llama(), TrainConfig(attention="efficient"), CPU)


def test_threads_are_set():
    before = torch.get_num_threads()
    try:
        prepare_for_speed(tiny_llama(), TrainConfig(threads=1), CPU)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compile_auto_is_on_on_cuda_and_on_a_cpu_only_where_it_pays(monkeypatch):
    from graftlm.train import speed
    from graftlm.train.speed import COMPILE_PAYS_S, compile_enabled

    bf16, fp32 = TrainConfig(precision="bf16"), TrainConfig(precision="fp32")
    assert compile_enabled(bf16, torch.device("cuda"))
    monkeypatch.setattr(speed, "_has_cpp_compiler", lambda: True)
    assert compile_enabled(bf16, CPU, COMPILE_PAYS_S)
    assert not compile_enabled(bf16, CPU, COMPILE_PAYS_S - 1)  # a short training would not win back the cost
    assert not compile_enabled(bf16, CPU, None)  # several processes: not estimated
    assert not compile_enabled(fp32, CPU, 10 * COMPILE_PAYS_S)  # not measured in fp32
    assert compile_enabled(TrainConfig(compile=True), CPU)
    assert not compile_enabled(TrainConfig(precision="bf16", compile=False), CPU, 10 * COMPILE_PAYS_S)
    monkeypatch.setattr(speed, "_has_cpp_compiler", lambda: False)  # inductor needs one on a CPU
    assert not compile_enabled(bf16, CPU, 10 * COMPILE_PAYS_S)
    with pytest.raises(ValueError):
        TrainConfig(compile="sometimes")


def test_the_estimate_for_compile_auto_is_the_trainings_flops_at_the_peak():
    from types import SimpleNamespace

    from graftlm.train.flops import flops_per_token, peak_flops
    from graftlm.train.stage import _estimated_seconds

    model, cfg = tiny_llama(), TrainConfig(precision="bf16", max_tokens=40_000, batch_tokens=4096, seq_len=256)
    alone, two = SimpleNamespace(device=CPU, num_processes=1), SimpleNamespace(device=CPU, num_processes=2)
    expected = flops_per_token(model.config, 256, model=model) * 10 * 4096 / peak_flops(CPU, bf16=True)
    assert _estimated_seconds(model, cfg, alone) == pytest.approx(expected)
    assert _estimated_seconds(model, cfg, two) is None


def test_compiled_code_goes_to_graftlms_cache_unless_the_user_chose_one(monkeypatch, tmp_path):
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from graftlm.train.speed import COMPILE_CACHE_ENV, compile_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(COMPILE_CACHE_ENV, os.path.abspath(default_cache_dir()))  # what torch writes there itself
    prepare_for_speed(tiny_llama(), TrainConfig(compile=True), CPU)  # compiles lazily: nothing is compiled here
    assert os.environ[COMPILE_CACHE_ENV] == str(compile_cache_dir()) == str(tmp_path / "graftlm" / "torch-compile")
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    prepare_for_speed(tiny_llama(), TrainConfig(compile=True), CPU)
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "mine")


@pytest.mark.slow
def test_compiled_blocks_train_close_to_eager_and_evaluate_eagerly():
    """Slow the first time only: compiled code goes to the persistent cache (speed.compile_cache_dir)."""
    import torch._dynamo.utils

    from graftlm.evaluate.scoring import Span, eval_mode, log_likelihoods

    tokens = torch.randint(0, 300, (2, 17))
    reference, model = tiny_llama(), tiny_llama()
    names = [name for name, _ in model.named_parameters()]
    prepare_for_speed(model, TrainConfig(compile=True), CPU)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints are unaffected
    losses = []
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = CausalLMLoss(m)(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(*losses, rtol=1e-2)
    grads = [[p.grad for p in m.parameters()] for m in (reference, model)]
    assert all(torch.allclose(a, b, rtol=0.05, atol=1e-3) for a, b in zip(*grads))
    spans = [Span(list(range(1, n)), 1) for n in (9, 12, 15)]  # three shapes: compiled, they would recompile
    torch._dynamo.utils.counters.clear()
    assert log_likelihoods(model, spans, 0) == pytest.approx(log_likelihoods(reference, spans, 0), rel=1e-6)
    with torch.no_grad(), eval_mode(model):  # generation and the lens: every new token a new shape
        model.generate(input_ids=tokens[:1, :5], max_new_tokens=4, do_sample=False)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]  # nothing compiled: all ran eagerly


def test_compile_of_a_model_without_a_list_of_blocks_is_an_error_asked_and_skipped_on_auto(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from graftlm.train import speed

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64))

    with pytest.raises(GraftError, match="no list of transformer blocks"):
        prepare_for_speed(gpt2(), TrainConfig(compile=True), CPU)
    monkeypatch.setattr(speed, "_has_cpp_compiler", lambda: True)
    suppress = torch._dynamo.config.suppress_errors  # auto sets it (monkeypatch would delete dynamo's config key)
    try:
        model = prepare_for_speed(gpt2(), TrainConfig(precision="bf16"), CPU, 10 * speed.COMPILE_PAYS_S)
        assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())  # left eager
        llama = prepare_for_speed(tiny_llama(), TrainConfig(precision="bf16"), CPU, 10 * speed.COMPILE_PAYS_S)
        assert all(block._compiled_call_impl is not None for block in llama.model.layers)  # compiled (lazily)
    finally:
        torch._dynamo.config.suppress_errors = suppress
