"""`graft compare RECIPE --vary KEY=V1,V2,...`: one recipe trained several ways on the same data and budget, and
one report that sets them side by side.

    runs/<name>/                       the recipe's own run directory: base/, curated/, vocab/, packed/ are shared
    runs/<name>/compare/<variant>/     a complete run directory per variant (train, merge, report as usual)
    runs/<name>/compare/report.html    every variant's bits-per-byte curves, and the Pareto table: target-language
                                       gain against source-language loss
    runs/<name>/compare/summary.json   the table's numbers

Several `--vary` make a grid (every combination of their values); with `--zip` the i-th values of each go
together (a list of variants; every --vary then needs as many values). Values are split at commas outside
brackets, each read as YAML like `--set` (`--vary train.freeze.layers=[0,1],[-2,-1]`). A variant whose data keys
(base_model, sources, curate, vocab, pack) resolve differently from the recipe's prepares its own data in its
folder; the others link the recipe's prepared folders, so nothing is re-packed. Every variant trains for the
recipe's budget; a variant already trained is skipped like any stage.
"""

from __future__ import annotations

import html
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from graftlm.errors import RecipeError
from graftlm.pipeline import PREPARE_STAGES, STAGES, run_stages
from graftlm.progress import log
from graftlm.recipe import Recipe, load_recipe
from graftlm.report import plots
from graftlm.report.page import STYLE, embed_png, html_table, target_bytes_per_s
from graftlm.report.verdict import Verdict, compute_verdict
from graftlm.runs import RunDir, write_json_atomic, write_text_atomic
from graftlm.stage import link_prepared

DATA_KEYS = tuple(dict.fromkeys(key for name in PREPARE_STAGES for key in STAGES[name].recipe_keys))
"""Recipe keys whose change needs other prepared data."""


def same_data(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes prepare the same data: their data keys resolve to the same values (a variant that sets
    `vocab` to what the recipe has already shares the recipe's data)."""
    dump_a, dump_b = a.model_dump(mode="json"), b.model_dump(mode="json")
    return all(dump_a.get(key) == dump_b.get(key) for key in DATA_KEYS)


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


def parse_vary(option: str) -> tuple[str, list[str]]:
    """`train.method=full,lora` -> ("train.method", ["full", "lora"])."""
    key, sep, raw = option.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise RecipeError(f"--vary {option}: expected key=value1,value2 (e.g. train.method=full,lora)")
    values, depth, current = [], 0, ""
    for char in raw:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if any(not v for v in values):
        raise RecipeError(f"--vary {option}: an empty value")
    return key, values


def make_variants(varies: list[str], zip_values: bool = False) -> list[Variant]:
    if not varies:
        raise RecipeError("compare: give at least one --vary key=value1,value2")
    parsed = [parse_vary(v) for v in varies]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise RecipeError(f"--vary: a key is given twice ({', '.join(keys)})")
    if zip_values:
        lengths = {len(values) for _, values in parsed}
        if len(lengths) != 1:
            raise RecipeError("--zip: every --vary needs as many values "
                              f"({', '.join(f'{k}: {len(v)}' for k, v in parsed)})")
        combinations = list(zip(*(values for _, values in parsed)))
    else:
        combinations = list(itertools.product(*(values for _, values in parsed)))
    short = [key.rsplit(".", 1)[-1] for key in keys]
    labels = short if len(set(short)) == len(short) else keys
    variants = []
    for values in combinations:
        name = "_".join(f"{label}-{value}" for label, value in zip(labels, values))
        name = re.sub(r"[^A-Za-z0-9._-]+", "", name.replace(",", "-").replace(" ", ""))
        variants.append(Variant(name, tuple(f"{key}={value}" for key, value in zip(keys, values))))
    if len({v.name for v in variants}) != len(variants):
        raise RecipeError("--vary: two variants would get the same folder name; use simpler values")
    return variants


def run_compare(recipe_path: Path | None, overrides: list[str], varies: list[str], zip_values: bool = False,
                runs_dir: str | os.PathLike = "runs") -> Path:
    """Run every variant (the shared data first) and write compare/report.html; returns its path."""
    recipe = load_recipe(recipe_path, overrides)
    parent = RunDir.for_recipe(recipe, runs_dir)
    variants = make_variants(varies, zip_values)
    loaded = [(v, load_recipe(recipe_path, [*overrides, *v.overrides, f"name={recipe.name}-{v.name}"]))
              for v in variants]  # every variant's recipe is checked before any work
    if any(same_data(recipe, variant_recipe) for _, variant_recipe in loaded):
        run_stages(recipe, parent, PREPARE_STAGES)
    runs: dict[str, tuple[Variant, Recipe, RunDir]] = {}
    for i, (variant, variant_recipe) in enumerate(loaded):
        log(f"compare: variant {i + 1}/{len(variants)}: {variant.name} ({' '.join(variant.overrides)})")
        run = RunDir(parent.inside("compare", variant.name), extended_vocab=variant_recipe.vocab is not None)
        if not same_data(recipe, variant_recipe):
            run_stages(variant_recipe, run, tuple(STAGES))
        else:  # the prepared data is the recipe's own, linked, and not to be touched
            link_prepared(parent, run, STAGES)
            run_stages(variant_recipe, run, tuple(s for s in STAGES if s not in PREPARE_STAGES), needs=False)
        runs[variant.name] = (variant, variant_recipe, run)
    page = write_compare_report(parent, runs)
    log(f"compare: {page}")
    return page


# ---- the report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    variant: str
    overrides: tuple[str, ...]
    verdict: Verdict | None
    training: dict

    def mean_bpb(self, role: str, which: str = "final") -> float | None:
        """The mean over the role's text sets of the final bits per byte (`which="final"`) or of its change from
        the variant's start model (`"delta"`)."""
        changes = self.verdict.of(role, "text") if self.verdict else []
        return sum(getattr(c, which) for c in changes) / len(changes) if changes else None


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The variants no other one beats on both counts: (source bpb, target bpb), lower is better for both."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return {name for name, point in points.items() if not dominated(point)}


def write_compare_report(parent: RunDir, runs: dict[str, tuple[Variant, Recipe, RunDir]]) -> Path:
    metrics = {name: run.read_metrics() for name, (_, _, run) in runs.items()}
    rows = []
    for name, (variant, recipe, run) in runs.items():
        training = run.training_summary()
        training["target_bytes_per_s"] = target_bytes_per_s(recipe, run, training)
        rows.append(Row(name, variant.overrides, compute_verdict(recipe, metrics[name]), training))
    # final bits per byte, not changes: variants may start from different models (an extended vocabulary starts
    # from its resized base), and bits per byte compare across tokenizers
    points = {r.variant: (r.mean_bpb("source"), r.mean_bpb("target")) for r in rows
              if r.mean_bpb("source") is not None and r.mean_bpb("target") is not None}
    front = pareto_front(points)
    sets = list(dict.fromkeys((c.role, c.kind, c.name) for r in rows if r.verdict for c in r.verdict.changes))
    summary = {r.variant: {
        "overrides": list(r.overrides), "run": str(runs[r.variant][2].root),
        "target_bpb": r.mean_bpb("target"), "source_bpb": r.mean_bpb("source"),
        "target_delta_bpb": r.mean_bpb("target", "delta"), "source_delta_bpb": r.mean_bpb("source", "delta"),
        "pareto": r.variant in front, "tokens": r.training.get("tokens"), "elapsed_s": r.training.get("elapsed_s"),
        "target_bytes_per_s": r.training.get("target_bytes_per_s"),
        "trainable_parameters": r.training.get("trainable_parameters"),
        "changes": {c.name: {"role": c.role, "kind": c.kind, "base": c.base, "final": c.final, "delta": c.delta}
                    for c in (r.verdict.changes if r.verdict else [])}} for r in rows}
    folder = parent.root / "compare"
    write_json_atomic(folder / "summary.json", summary)

    table_rows = []
    for r in sorted(rows, key=lambda r: (r.variant not in front, r.mean_bpb("target") or 0)):
        by_set = {(c.role, c.kind, c.name): c for c in (r.verdict.changes if r.verdict else [])}
        speed = (f"{r.training['tokens'] / r.training['elapsed_s']:,.0f}"
                 if r.training.get("tokens") and r.training.get("elapsed_s") else "—")
        target_speed = r.training.get("target_bytes_per_s")
        trainable = r.training.get("trainable_parameters") or [{}]
        table_rows.append((r.variant, " ".join(r.overrides), *(_change_cell(by_set.get(s)) for s in sets),
                           _number(r.mean_bpb("target")), _number(r.mean_bpb("source")),
                           "yes" if r.variant in front else "", f"{trainable[-1].get('parameters', 0):,}", speed,
                           f"{target_speed:,.0f}" if target_speed else "—"))
    table = html_table(("variant", "overrides",
                        *(f"{role} {name} {'bpb' if kind == 'text' else 'accuracy'} (Δ)" for role, kind, name in sets),
                        "target bpb (mean)", "source bpb (mean)", "Pareto", "trainable parameters", "tokens/s",
                        "target bytes/s"),
                       table_rows, text_columns=2)
    figures = [plots.pareto_scatter(points, front, plots.variant_colors(list(runs))),
               plots.compare_curves(metrics, "text"), plots.compare_curves(metrics, "choice")]
    links = "".join(f"<li><a href='{html.escape(name)}/report.html'>{html.escape(name)}</a></li>" for name in runs)
    title = html.escape(parent.root.name)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>graftlm · compare {title}</title>"
            f"<style>{STYLE}</style></head><body><h1>graftlm comparison: {title}</h1>"
            f"<p class='muted'>{len(runs)} variants of one recipe, the same data and budget · "
            f"{html.escape(str(folder))}</p><h2>Gain against loss</h2>"
            "<p class='summary'>Each variant's final model: bits per byte (lower is better; comparable across "
            "tokenizers) and, in brackets, the change from the variant's own start model — the base, or the base "
            "with its vocabulary extended. The target language should fall, the source languages should not rise. "
            "A variant is on the Pareto front when no other one ends lower on both. Target bytes/s: training "
            "throughput in UTF-8 bytes of target-language text (a tokenizer that needs fewer tokens for the same "
            "text reads more of it at the same tokens/s).</p>"
            f"{table}" + "".join(embed_png(f) for f in figures if f)
            + f"<h2>Variants</h2><ul>{links}</ul></body></html>")
    write_text_atomic(folder / "report.html", page)
    return folder / "report.html"


def _change_cell(change) -> str | tuple[str, str]:
    """`final (Δ)`, coloured by whether the change is for the better."""
    if change is None:
        return "—"
    mark = "better" if change.better else ("worse" if change.delta else "")
    return f"{change.final:.4f} ({change.delta:+.4f})", mark


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"

