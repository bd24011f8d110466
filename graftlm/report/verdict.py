"""The verdict of a run: what the target language gained and what the source languages lost, from metrics.jsonl.

Every evaluation record in metrics.jsonl is `{"step", "tokens", "eval": {"text": {...}, "choice": {...}}}`; the
first is the base model (step 0), the last the trained one. A set belongs to the target language when its
language (the `eval.text` key, or a choice set's `lang`) is the recipe's target language (`Recipe.target_language`).
"""

from __future__ import annotations

from dataclasses import dataclass

from graftlm.languages import same_language
from graftlm.recipe import Recipe


@dataclass(frozen=True)
class Change:
    kind: str  # "text" (bits per byte, lower is better) or "choice" (accuracy, higher is better)
    name: str
    lang: str
    role: str  # "target" or "source"
    base: float
    final: float

    @property
    def delta(self) -> float:
        return self.final - self.base

    @property
    def better(self) -> bool:
        return self.delta < 0 if self.kind == "text" else self.delta > 0


@dataclass(frozen=True)
class Verdict:
    target: str
    changes: list[Change]
    base_step: int
    final_step: int
    margin_bpb: float

    def of(self, role: str, kind: str) -> list[Change]:
        return [c for c in self.changes if c.role == role and c.kind == kind]

    @property
    def source_kept(self) -> bool:
        """Every source-language text set's bpb rose by at most the margin."""
        return all(c.delta <= self.margin_bpb for c in self.of("source", "text"))

    def summary(self) -> str:
        parts = [f"{c.lang} {'bpb' if c.kind == 'text' else c.name} {c.base:.3f} -> {c.final:.3f} ({c.delta:+.3f})"
                 for c in self.changes if c.kind == "text"]
        kept = "within" if self.source_kept else "beyond"
        return "; ".join(parts) + f". Source-language bpb {kept} the margin of {self.margin_bpb:+.3f}."


def eval_records(metrics: list[dict]) -> list[dict]:
    return [r for r in metrics if "eval" in r]


def compute_verdict(recipe: Recipe, metrics: list[dict]) -> Verdict | None:
    """None until the run has been evaluated at least twice (base and trained)."""
    records = eval_records(metrics)
    if len(records) < 2:
        return None
    first, last = records[0], records[-1]
    target = recipe.target_language
    changes = []
    for name, result in last["eval"]["text"].items():
        if name in first["eval"]["text"]:
            changes.append(Change("text", name, name, "target" if same_language(name, target) else "source",
                                  first["eval"]["text"][name]["bpb"], result["bpb"]))
    for name, result in last["eval"]["choice"].items():
        if name in first["eval"]["choice"]:
            config = recipe.eval.choice.get(name)
            lang = (config.lang if config is not None else None) or name
            changes.append(Change("choice", name, lang, "target" if same_language(lang, target) else "source",
                                  first["eval"]["choice"][name]["accuracy"], result["accuracy"]))
    changes.sort(key=lambda c: (c.role != "target", c.kind != "text", c.name))
    return Verdict(target, changes, first["step"], last["step"], recipe.report.source_margin_bpb)


def verdict_rows(verdict: Verdict) -> list[tuple[str, str, str, str, str, str]]:
    """(role, set, metric, base, trained, change) rows, shared by the terminal table, the HTML page and the card."""
    rows = []
    for c in verdict.changes:
        metric = "bits/byte" if c.kind == "text" else "accuracy"
        mark = "better" if c.better else ("same" if c.delta == 0 else "worse")
        rows.append((f"{c.role} ({c.lang})", c.name, metric, f"{c.base:.4f}", f"{c.final:.4f}",
                     f"{c.delta:+.4f} {mark}"))
    return rows
