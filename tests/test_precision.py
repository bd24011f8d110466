"""`train.precision: auto` and `eval.dtype: auto`: bf16 only where the device computes it faster than fp32."""

import pytest

from conftest import train, write_tiny_recipe
from graftlm import precision
from graftlm.pipeline import run_stages
from graftlm.recipe import load_recipe
from graftlm.runs import RunDir

TRAIN = "seq_len: 32, batch_tokens: 128, max_steps: 3, lr: 1.0e-3, micro_batch_size: 2"


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Make this CPU's bf16 fast or slow: a function of the measured seconds per product."""

    def make(fast: bool) -> None:
        precision.fast_bf16.cache_clear()
        monkeypatch.setattr(precision, "_seconds_per_product", lambda: (0.001 if fast else 0.1, 0.01))

    yield make
    precision.fast_bf16.cache_clear()


def test_auto_is_bf16_only_where_bf16_is_the_faster(cpu_bf16):
    cpu_bf16(fast=False)
    assert precision.train_precision("auto", "cpu") == "fp32" and precision.eval_dtype("auto", "cpu") == "float32"
    assert precision.train_precision("bf16", "cpu") == "bf16" and precision.eval_dtype("bfloat16", "cpu") == "bfloat16"
    cpu_bf16(fast=True)
    assert precision.train_precision("auto", "cpu") == "bf16" and precision.eval_dtype("auto", "cpu") == "bfloat16"
    assert precision.train_precision("fp32", "cpu") == "fp32" and precision.eval_dtype("float32", "cpu") == "float32"


def test_the_measurement_leaves_the_global_random_state_alone():
    import torch

    precision.fast_bf16.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    precision.fast_bf16("cpu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fast", [False, True])
def test_auto_trains_as_the_precision_it_becomes(fast, cpu_bf16, tmp_path, tiny_model_dir, capsys):
    cpu_bf16(fast)
    losses = {}
    for setting in ("auto", "bf16" if fast else "fp32"):
        (tmp_path / setting).mkdir()
        path = write_tiny_recipe(tmp_path / setting, tiny_model_dir, f"{TRAIN}, precision: {setting}")
        recipe = load_recipe(path)
        run = RunDir.for_recipe(recipe, tmp_path / setting / "runs")
        run_stages(recipe, run, ("base", "pack"))
        train(recipe, run)
        losses[setting] = [r["loss"] for r in run.read_metrics() if "loss" in r]
        assert load_recipe(run.recipe).train.precision == setting  # the recipe keeps what it says
    assert losses["auto"] == losses["bf16" if fast else "fp32"]
    assert f"on cpu, {'bf16' if fast else 'fp32'}" in capsys.readouterr().err
