"""The real default base model: GGUF in, plain Hugging Face folder out, same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graftlm.errors import GraftError
from graftlm.models import load_model, resolve_model, save_model


def test_resolve_model_kinds(tmp_path, tiny_model_dir):
    assert resolve_model("smollm2-135m").gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(str(tiny_model_dir)).kind == "folder"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(GraftError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(GraftError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path))


@pytest.mark.slow
def test_gguf_and_exported_folder_give_the_same_logits(tmp_path):
    model = load_model("smollm2-135m")
    from graftlm.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    save_model(model, tokenizer, tmp_path / "base")
    config = json.loads((tmp_path / "base/config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "base/model.safetensors").is_file()

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # no graftlm involved
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    text = "Hà Nội là thủ đô của Việt Nam. The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, plain_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
