"""The `pack` stage: every source of the recipe tokenised with the run's tokenizer into runs/<name>/packed/<source>/
(graftlm/data/pack.py), one unit per source. A source that curation cleaned is packed from its curated text."""

from __future__ import annotations

from graftlm.data.config import SourceConfig
from graftlm.data.pack import pack_inputs, pack_source
from graftlm.stage import Stage


class Pack(Stage):
    name = "pack"
    needs = ("base", "curate", "vocab")
    prepares_data = True
    recipe_keys = ("sources", "pack")
    outputs = ("packed",)

    def units(self):
        return list(self.recipe.sources)

    def marker(self, unit):
        return self.run_dir.inside("packed", unit, "manifest.json")

    def fingerprint(self, unit):
        return pack_inputs(unit, training_source(self.run_dir, self.recipe, unit), self.run_dir.start_model,
                           self.recipe.pack)

    def run(self, unit, key):
        pack_source(unit, training_source(self.run_dir, self.recipe, unit), self.run_dir.start_model,
                    self.run_dir.inside("packed", unit), self.recipe.pack, key)


def training_source(run, recipe, name: str) -> SourceConfig:
    """What training reads for a source: its curated documents when the recipe curates it, else the raw ones."""
    source = recipe.sources[name]
    if name in recipe.curated_sources():
        return SourceConfig(paths=[str(run.inside("curated", name, "*.jsonl.gz"))], format="jsonl", text_field="text",
                            lang=source.lang)
    return source
