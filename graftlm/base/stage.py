"""The `base` stage: the recipe's base model as a plain Hugging Face folder, runs/<name>/base/.

Whatever `base_model:` names (the bundled default, a .gguf file, a Hugging Face folder, a hub id), every later stage
reads this folder: GGUF weights are dequantised once, here.
"""

from __future__ import annotations

import json

from graftlm.models import load_model, load_tokenizer, resolve_model, save_model
from graftlm.progress import log
from graftlm.stage import Stage


class Base(Stage):
    name = "base"
    prepares_data = True
    recipe_keys = ("base_model", "trust_remote_code")
    outputs = ("base",)

    def marker(self, unit):
        return self.run_dir.base_marker

    def fingerprint(self, unit):
        return [self.recipe.base_model, resolve_model(self.recipe.base_model).signature()]

    def run(self, unit, key):
        recipe, folder = self.recipe, self.run_dir.base
        kind = resolve_model(recipe.base_model).kind
        log(f"base: loading {recipe.base_model} ({kind})")
        model = load_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code)
        tokenizer = load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code)
        record = {"base_model": recipe.base_model, "kind": kind, "fingerprint": key,
                  "parameters": sum(p.numel() for p in model.parameters())}
        save_model(model, tokenizer, folder, extra_files={self.marker(unit).name: json.dumps(record, indent=2)})
        log(f"base: wrote {folder}")
