"""The plan's outputs, in the plan's folder (`runs/<name>/plan/`):

    plan.json     the law, its parameters and fit quality, the predictions, the choice, the validation
    recipe.yaml   the input recipe with the chosen mixture, the budget and a WSD schedule, ready for `graft run`
    report.html   the pilots' points, the fitted curves per share, the tolerance, the choice, the validation

Each file is written under a temporary name and renamed when complete; plan.json last, so that its presence
means the plan is whole.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from graftlm.plan.choose import Plan
from graftlm.plan.laws import Point
from graftlm.plan.pilots import planned_recipe
from graftlm.recipe import Recipe
from graftlm.report.page import STYLE, embed_png, html_table
from graftlm.report.plots import SOURCE_COLOR, TARGET_COLOR, _png, _tokens_axis, plt
from graftlm.runs import write_json_atomic, write_text_atomic

CHOSEN_COLOR = "#111"


def write_plan(folder: str | os.PathLike, recipe: Recipe, plan: Plan, points: list[Point],
               validation: list[Point] | None = None, key: str | None = None) -> dict:
    """Write recipe.yaml, report.html and plan.json into `folder`; returns plan.json's content (with
    `"fingerprint": key` when given: plan.json is the plan stage's marker)."""
    folder = Path(folder)
    planned = planned_recipe(recipe, plan)
    data = plan.to_json() | ({"fingerprint": key} if key is not None else {})
    write_text_atomic(folder / "recipe.yaml", planned.to_yaml())
    write_text_atomic(folder / "report.html", report_page(recipe, plan, data, points, validation or []))
    write_json_atomic(folder / "plan.json", data)
    return data


def summary(data: dict) -> str:
    """The plan in two lines, for the terminal."""
    chosen = data["chosen"]
    sources = ", ".join(f"{s} {v:.4f} (rise {chosen['max_source_rise'][s]:+.4f} at most)"
                        for s, v in chosen["predicted_source_bpb"].items())
    line = (f"plan ({data['law']}): target share {_share(chosen['ratio'])}, {chosen['budget_tokens']:,} tokens; "
            f"predicted at {chosen['predicted_at_tokens']:,} tokens: {data['target']} "
            f"{chosen['predicted_target_bpb']:.4f} bpb, {sources}")
    if chosen["extrapolated"]:
        line += f"; extrapolated past the pilots' {max(p['max_tokens'] for p in data['pilots']):,} tokens"
    for name, bounds in data.get("at_bounds", {}).items():
        line += (f"\n{name}: " + ", ".join(f"{p} {b['value']:.3g} at its bound {b['bound']:g}"
                                           for p, b in bounds.items())
                 + " (not decided by the pilots: there the law's form is an assumption)")
    v = data["validation"]
    if v:
        line += "\nvalidation at " + _share(v["ratio"]) + f", {v['tokens']:,} tokens: " + ", ".join(
            f"{s} predicted {v['predicted'][s]:.4f}, measured {v['measured'][s]:.4f} ({v['error'][s]:+.2%})"
            for s in v["predicted"])
    return line


# ---- the page -------------------------------------------------------------------------------------------

def report_page(recipe: Recipe, plan: Plan, data: dict, points: list[Point], validation: list[Point]) -> str:
    figures = ([mixture_parity(plan, points, validation)] if plan.law.name == "mixing"
               else [curves_by_share(plan, points, validation), decision_curve(plan)])
    chosen = data["chosen"]
    sections = [
        f"<h1>graftlm plan: {_e(recipe.name)}</h1>",
        f"<p class='muted'>law {_e(data['law'])} · {len(data['pilots'])} pilots · tolerance "
        f"{_e(_tolerance(recipe))} on {_e(', '.join(plan.sources))}</p>",
        f"<p class='summary'>{_e(summary(data)).replace(chr(10), '<br>')}</p>",
        "<h2>Choice</h2>" + html_table(
            ("share", "budget tokens", "predicted at", f"{plan.target} bpb (target)",
             *(f"{s} bpb" for s in plan.sources), *(f"{s} largest rise" for s in plan.sources)),
            [(_share(chosen["ratio"]), f"{chosen['budget_tokens']:,}", f"{chosen['predicted_at_tokens']:,}",
              f"{chosen['predicted_target_bpb']:.4f}", *(f"{v:.4f}" for v in chosen["predicted_source_bpb"].values()),
              *(f"{v:+.4f} (≤ {plan.allowed[s]:+.4f})" for s, v in chosen["max_source_rise"].items()))]),
        "".join(embed_png(f) for f in figures if f),
        _validation_section(data["validation"]),
        _fit_section(data),
        "<h2>Predictions</h2>" + html_table(
            ("share", "tokens", f"{plan.target} bpb", *(f"{s} bpb" for s in plan.sources), "extrapolated"),
            [(_share(p["ratio"]), f"{p['tokens']:,}", f"{p['target_bpb']:.4f}",
              *(f"{v:.4f}" for v in p["source_bpb"].values()),
              ", ".join(k for k in ("tokens", "ratios") if p["extrapolated" if k == "tokens" else "outside_ratios"])
              or "no") for p in data["predictions"]], last_text=True),
        f"<h2>Planned recipe</h2><details><summary>recipe.yaml</summary><pre>"
        f"{_e(planned_recipe(recipe, plan).to_yaml())}</pre></details>",
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>graftlm plan · {_e(recipe.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")


def _validation_section(v: dict | None) -> str:
    if not v:
        return "<h2>Validation</h2><p class='muted'>no validation pilot (plan.validate)</p>"
    where = "past the fitted tokens" if v["extrapolated"] else "within the fitted tokens"
    where += ", outside the pilots' shares" if v["outside_ratios"] else ", between the pilots' shares"
    return (f"<h2>Validation</h2><p class='muted'>a pilot not used in the fit, at share {_e(_share(v['ratio']))} "
            f"and {v['tokens']:,} tokens ({where})</p>"
            + html_table(("set", "predicted bpb", "measured bpb", "error"),
                         [(s, f"{v['predicted'][s]:.4f}", f"{v['measured'][s]:.4f}", f"{v['error'][s]:+.2%}")
                          for s in v["predicted"]]))


def _fit_section(data: dict) -> str:
    fit = data["fit"]
    rows = [(s, f"{fit['r2'][s]:.4f}", f"{fit['huber'][s]:.3g}", f"{fit['rmse'][s]:.4f}", f"{fit['points'][s]}")
            for s in fit["r2"]]
    page = "<h2>Fit</h2>" + html_table(("set", "R²", "Huber loss", "RMS error (bpb)", "points"), rows)
    if data.get("held_out"):
        held = data["held_out"]
        page += ("<p class='muted'>law both: leave-one-pilot-out error (mean absolute bpb) "
                 + _e(", ".join(f"{k} {v:.4f}" if v is not None else f"{k} failed" for k, v in held["error"].items()))
                 + f"; kept {_e(data['law'])}</p>")
    page += "<h3>Parameters</h3>" + html_table(("set", "parameters"), [
        (s, ", ".join(_params(p))) for s, p in data["params"].items()], last_text=True)
    return page


def _params(p: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in p.items():
        if isinstance(v, dict):
            out += _params(v, f"{prefix}{k}:")
        else:
            out.append(f"{prefix}{k}={v:.4g}" if isinstance(v, float) else f"{prefix}{k}={v}")
    return out


# ---- the figures ----------------------------------------------------------------------------------------

def curves_by_share(plan: Plan, points: list[Point], validation: list[Point]) -> bytes:
    """One panel per set: the pilots' measured points, the fitted curve of each pilot share (dashed past the
    pilots' tokens) up to the budget, the start model, the tolerance, the chosen share's curve, and the validation
    pilot's measured point against its prediction."""
    sets = [plan.target, *plan.sources]
    span = plan.law.span
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(span.ratios)))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 3.8), squeeze=False)
    fitted = np.geomspace(span.min_tokens, span.max_tokens, 60)
    beyond = np.geomspace(span.max_tokens, max(plan.budget_tokens, span.max_tokens), 60)
    for ax, name in zip(axes[0], sets):
        for color, ratio in zip(colors, span.ratios):
            measured = [p for p in points if p.ratio == ratio and p.tokens > 0]
            ax.plot([p.tokens for p in measured], [p.bpb[name] for p in measured], "o", color=color, markersize=3.5)
            ax.plot(fitted, plan.predict(ratio, fitted)[name], color=color, linewidth=1.2, label=f"share {ratio:g}")
            ax.plot(beyond, plan.predict(ratio, beyond)[name], color=color, linewidth=1, linestyle="--")
        chosen = plan.chosen.ratio
        ax.plot(np.concatenate([fitted, beyond]), plan.predict(chosen, np.concatenate([fitted, beyond]))[name],
                color=CHOSEN_COLOR, linewidth=2, label=f"chosen {chosen:g}")
        ax.axhline(plan.base[name], color="#777", linestyle=":", linewidth=1, label="start model")
        if name in plan.sources:
            ax.axhline(plan.base[name] + plan.allowed[name], color=SOURCE_COLOR, linestyle="-.", linewidth=1,
                       label="tolerance")
        _validation_marks(ax, plan, validation, name)
        ax.axvline(span.max_tokens, color="#bbb", linewidth=0.8)
        ax.set_xscale("log")
        _tokens_axis(ax, "tokens (log; dashed: extrapolated)")
        ax.set_ylabel("bits per byte")
        ax.set_title(f"{name} ({'target' if name == plan.target else 'source'})", fontsize=9,
                     color=TARGET_COLOR if name == plan.target else SOURCE_COLOR)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"Pilots and the fitted {plan.law.name} law, up to the budget of {plan.budget_tokens:,} tokens",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _validation_marks(ax, plan: Plan, validation: list[Point], name: str) -> None:
    if not plan.validation:
        return
    v = plan.validation
    trained = [p for p in validation if p.tokens > 0]
    ax.plot([p.tokens for p in trained], [p.bpb[name] for p in trained], "*", color="#e0a800", markersize=11,
            markeredgecolor="black", label=f"validation {_share(v['ratio'])}, measured")
    ax.plot(v["tokens"], v["predicted"][name], "D", markerfacecolor="none", markeredgecolor="#e0a800",
            markersize=8, label="its prediction")


def decision_curve(plan: Plan) -> bytes | None:
    """The choice: each source set's largest predicted rise up to the budget, against the target share, with the
    tolerance and the chosen share."""
    if not plan.decision:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ratios = [r for r, _ in plan.decision]
    for name in plan.sources:
        ax.plot(ratios, [rises[name] for _, rises in plan.decision], label=f"{name}: largest rise")
        ax.axhline(plan.allowed[name], color=SOURCE_COLOR, linestyle="-.", linewidth=1, label=f"{name}: tolerance")
    for ratio in plan.law.span.ratios:
        ax.axvline(ratio, color="#ddd", linewidth=0.8)
    ax.axvline(plan.chosen.ratio, color=CHOSEN_COLOR, linewidth=1.5, label=f"chosen {plan.chosen.ratio:g}")
    ax.set_xlabel("target share (grey: the pilots')")
    ax.set_ylabel(f"bpb rise up to {plan.budget_tokens:,} tokens")
    ax.set_title("The choice: the largest share within the tolerance", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def mixture_parity(plan: Plan, points: list[Point], validation: list[Point]) -> bytes:
    """Data Mixing Laws: measured against predicted bpb at the pilots' length, per set (the validation pilot
    starred)."""
    sets = [plan.target, *plan.sources]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.8 * len(sets), 3.6), squeeze=False)
    length = plan.law.span.max_tokens
    finals = [p for p in points if p.tokens == length]
    for ax, name in zip(axes[0], sets):
        measured = [p.bpb[name] for p in finals]
        predicted = [float(plan.predict(p.shares or p.ratio, [length])[name][0]) for p in finals]
        ax.plot(predicted, measured, "o", color=TARGET_COLOR if name == plan.target else SOURCE_COLOR)
        if plan.validation:
            v = plan.validation
            ax.plot(v["predicted"][name], v["measured"][name], "*", color="#e0a800", markersize=12,
                    markeredgecolor="black", label="validation")
            ax.legend(fontsize=7)
        low, high = min(measured + predicted), max(measured + predicted)
        ax.plot([low, high], [low, high], color="#999", linewidth=0.8)
        ax.set_xlabel("predicted bpb")
        ax.set_ylabel("measured bpb")
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"Data Mixing Law at the pilots' length ({length:,} tokens)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _share(ratio) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in ratio.items()) if isinstance(ratio, dict) else f"{ratio:g}"


def _tolerance(recipe: Recipe) -> str:
    t = recipe.plan.tolerance
    return f"+{t.bpb:g} bpb" if t.bpb is not None else f"+{t.relative:.1%} of the start model's bpb"


def _e(text: str) -> str:
    return html.escape(str(text))
