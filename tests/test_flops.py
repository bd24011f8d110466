"""Throughput figures (graftlm/train/flops.py): FLOPs per token against a count by hand, the CUDA peak table, the
measured CPU peak and its cache, MFU and peak memory."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from graftlm.train import flops


def tiny_llama(**overrides) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                          **overrides})


def test_llama_flops_per_token_by_hand():
    # per layer: q 32x32, k and v 32x(2 KV heads x 8), o 32x32, gate/up/down 32x64 each
    per_layer = 1024 + 512 + 512 + 1024 + 3 * 2048
    n = 2 * per_layer + 100 * 32  # + the output projection (tied: the embedding's matrix, counted once)
    attention = 12 * 2 * 4 * 8 * 16  # 12 * layers * query heads * head dim * seq len
    assert flops.flops_per_token(tiny_llama(), seq_len=16) == 6 * n + attention == 142_080
    # the embedding lookup is not a product: an untied output projection counts the same
    assert flops.flops_per_token(tiny_llama(tie_word_embeddings=False), seq_len=16) == 142_080
    # the model built for real has the same linear weights as the meta-device count
    torch.manual_seed(0)
    assert flops.matmul_params(LlamaForCausalLM(tiny_llama())) == n


def test_gpt2_conv1d_layers_are_counted():
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # c_attn, attn c_proj, mlp c_fc, mlp c_proj
    assert flops.flops_per_token(config, seq_len=16) == 6 * (2 * per_layer + 100 * 32) + 12 * 2 * 4 * 8 * 16


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA GH200 480GB", 989.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None), ("Tesla T4", None),
])
def test_cuda_peaks_by_device_name(name, tflops):
    assert flops.cuda_peak_flops(name) == (tflops * 1e12 if tflops else None)


def test_cpu_peak_is_measured_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "CPU_SHAPES", [(256, 256, 256)])
    monkeypatch.setattr(flops, "CPU_SECONDS_PER_SHAPE", 0.05)
    measured = []
    measure = flops.measure_cpu_matmul_flops
    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda **kw: measured.append(measure(**kw)) or measured[-1])

    first = flops.peak_flops("cpu")
    assert first > 1e8 and len(measured) == 1  # a CPU does more than 0.1 GFLOP/s
    cached = json.loads((tmp_path / "cpu_bf16_peak.json").read_text())
    assert cached[flops.cpu_key()]["flops"] == first and str(torch.get_num_threads()) in flops.cpu_key()
    assert flops.peak_flops("cpu") == first and len(measured) == 1  # read back, not measured again
    assert flops.cpu_peak_flops(refresh=True) == measured[1]
    (tmp_path / "cpu_bf16_peak.json").write_text("{not json")
    flops.cpu_peak_flops()
    assert len(measured) == 3  # a damaged cache is measured again
    monkeypatch.setattr(flops, "cpu_key", lambda: "another CPU | torch x | 64 threads")
    flops.cpu_peak_flops()
    assert len(measured) == 4 and len(json.loads((tmp_path / "cpu_bf16_peak.json").read_text())) == 2


def test_mfu():
    assert flops.mfu(1000, 1e9, 2e12) == 0.5
    assert flops.mfu(1000, 1e9, None) is None


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc/self/status")
def test_peak_memory_is_the_kernel_s_high_water_mark_in_bytes():
    def status_kib(field: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    peak = flops.peak_memory_bytes("cpu")
    assert abs(peak - status_kib("VmHWM:") * 1024) < 64 * 2**20  # ru_maxrss is in KiB on Linux
    assert peak >= status_kib("VmRSS:") * 1024 - 64 * 2**20
