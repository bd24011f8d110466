"""Shared fixtures: the real SmolLM2 tokenizer (extracted once per session from the bundled GGUF) and tiny random
models built from a config, so that unit tests take milliseconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny models run faster on one thread, and subprocesses (kill-and-resume, DDP) inherit the setting, so that
# every process of a test reduces in the same order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the CPU's measured bf16 peak (for MFU) is cached here, not in the user's ~/.cache
os.environ.setdefault("GRAFT_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"graft-test-cache-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding only the tokenizer of the default base model."""
    from graftlm.models import load_tokenizer, save_tokenizer

    folder = tmp_path_factory.mktemp("smol-tokenizer")
    save_tokenizer(load_tokenizer("smollm2-135m"), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A Hugging Face folder with a tiny random Llama that uses the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from graftlm.models import save_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    save_model(LlamaForCausalLM(config), tokenizer, folder)
    return folder


def train(recipe, run, fresh: bool = False, on_step_end=None) -> None:
    """The train stage through the stage runner (its inputs prepared first when needed)."""
    from graftlm.pipeline import run_stages

    run_stages(recipe, run, ("train",), options={"train": {"fresh": fresh, "on_step_end": on_step_end}})


def run_graft(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the `graft` command in-process; returns (exit code, stdout, stderr)."""
    from graftlm.cli import main

    monkeypatch.setattr(sys, "argv", ["graft", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


TINY_RECIPE = """
name: tiny
base_model: {model}
sources:
  vi: {{paths: ['{data}/vi/viwiki.jsonl'], max_documents: 20, lang: vi}}
  en: {{paths: ['{data}/en/debian_handbook.jsonl'], max_documents: 20, lang: en}}
mixture: {{vi: 0.75, en: 0.25}}
train: {{{train}}}
{extra}"""


def write_tiny_recipe(folder: Path, model: Path, train: str, extra: str = "") -> Path:
    """A recipe on the tiny model and 20 documents of each bundled language; `train` is the flow-style section."""
    path = folder / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(model=model, data=DATA, train=train, extra=extra))
    return path


def last_logged_step(run) -> int:
    return max((r["step"] for r in run.read_metrics() if "loss" in r), default=0)


def kill_training_mid_run(recipe_path: Path, run, after_step: int, overrides=(), timeout: float = 180) -> int:
    """Start `graft train` in a subprocess, SIGKILL it once it has logged `after_step`; returns the last step
    it logged."""
    import signal
    import subprocess
    import time

    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "graftlm", "train", str(recipe_path), "--runs-dir",
                             str(run.root.parent), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)
    deadline = time.time() + timeout
    while time.time() < deadline and last_logged_step(run) < after_step and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return last_logged_step(run)
