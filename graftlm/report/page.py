"""`graft report RUN_DIR`: one self-contained HTML page for a run, a model card for its model, and the verdict
table in the terminal.

The page holds the verdict (target gain, source loss), the curves (loss and lr, bits per byte and accuracy over
training with the base level drawn, tokens per source), the data each stage produced, and the recipe. Figures are
embedded as base64 PNG, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from graftlm.recipe import Recipe, load_recipe
from graftlm.report import plots
from graftlm.report.verdict import Verdict, compute_verdict, verdict_rows
from graftlm.runs import RunDir, read_json, write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child, td.name { text-align: left; }
.better { color: #1e7e34; font-weight: 600; } .worse { color: #b02a37; font-weight: 600; }
.summary { background: #f7f7f2; border-left: 4px solid #8a8; padding: 0.6em 1em; }
img { max-width: 100%; margin: 0.5em 0; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #777; font-size: 0.9em; }
"""


def load_run(run_dir: str | Path) -> tuple[Recipe, RunDir]:
    run = RunDir(Path(run_dir))
    if not run.recipe.is_file():
        from graftlm.errors import GraftError

        raise GraftError(f"{run.root}: not a run directory (no recipe.yaml)")
    return load_recipe(run.recipe), run


def build_report(recipe: Recipe, run: RunDir) -> Verdict | None:
    """Write report.html (and the model card when the model exists); return the verdict."""
    metrics = run.read_metrics()
    verdict = compute_verdict(recipe, metrics)
    langs = {name: (c.lang or name) for name, c in recipe.eval.choice.items()}
    target = verdict.target if verdict else None
    figures = [plots.loss_and_lr(metrics), plots.eval_curves(metrics, "text", target, {}),
               plots.eval_curves(metrics, "choice", target, langs), plots.tokens_by_source(metrics)]
    training = _training_summary(run)
    sections = [
        f"<h1>graftlm run: {_e(recipe.name)}</h1>",
        f"<p class='muted'>base model {_e(recipe.base_model)} · {_e(str(run.root))}</p>",
        _verdict_section(verdict, training),
        "<h2>Curves</h2>" + "".join(_img(f) for f in figures if f) if any(figures) else "",
        _data_section(run),
        f"<h2>Recipe</h2><pre>{_e(recipe.to_yaml())}</pre>",
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>graftlm · {_e(recipe.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    write_text_atomic(run.report, page)
    if (run.final_model / "config.json").is_file():
        write_text_atomic(run.final_model / "README.md", model_card(recipe, verdict, training))
    return verdict


def verdict_table(verdict: Verdict | None):
    """The verdict for the terminal (rich)."""
    from rich.table import Table

    table = Table(title="verdict: what was gained, what was lost", show_edge=False)
    for column in ("role", "set", "metric", "base", "trained", "change"):
        table.add_column(column, justify="left" if column in ("role", "set", "metric") else "right",
                         overflow="fold")
    for row in verdict_rows(verdict) if verdict else []:
        style = "green" if row[-1].endswith("better") else ("red" if row[-1].endswith("worse") else "")
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/]" if style else row[-1])
    return table


def model_card(recipe: Recipe, verdict: Verdict | None, training: dict) -> str:
    lines = [f"# {recipe.name}", "",
             f"Continued pre-training of `{recipe.base_model}` with [graftlm](https://pypi.org/project/graftlm/).", "",
             "## Data", "", "| source | language | mixture weight |", "|---|---|---|"]
    weights = recipe.mixture_weights()
    lines += [f"| {n} | {s.lang or ''} | {weights.get(n, 0):g} |" for n, s in recipe.sources.items()]
    lines += ["", "## Training", "",
              f"{training.get('step', '?')} steps, {training.get('tokens', 0):,} tokens "
              f"({recipe.train.seq_len}-token sequences, peak lr {recipe.train.lr:g}, "
              f"{recipe.train.schedule.name} schedule), {training.get('elapsed_s', 0):.0f} s of training.", ""]
    if verdict:
        lines += ["## Evaluation: gained and lost", "",
                  f"Base model (step {verdict.base_step}) against this model (step {verdict.final_step}). "
                  "Bits per byte: lower is better; accuracy: higher is better.", "",
                  "| role | set | metric | base | trained | change |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in verdict_rows(verdict)]
        lines += ["", verdict.summary()]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", ""]
    return "\n".join(lines)


def _training_summary(run: RunDir) -> dict:
    marker = run.model / "graft-train.json"
    return read_json(marker) if marker.is_file() else {}


def _verdict_section(verdict: Verdict | None, training: dict) -> str:
    if verdict is None:
        return "<h2>Verdict</h2><p>Not evaluated yet: the verdict needs the base and a trained evaluation.</p>"
    rows = "".join(
        "<tr>" + "".join(f"<td class='name'>{_e(c)}</td>" for c in row[:3])
        + "".join(f"<td>{_e(c)}</td>" for c in row[3:5])
        + f"<td class='{row[5].split()[-1]}'>{_e(row[5])}</td></tr>" for row in verdict_rows(verdict))
    tokens = training.get("tokens")
    elapsed = training.get("elapsed_s")
    speed = f" · {tokens / elapsed:,.0f} tokens/s" if tokens and elapsed else ""
    trained = (f"<p>{tokens:,} tokens in {training.get('step')} steps, {elapsed:,.0f} s of training{speed}; "
               f"{training.get('skipped_steps', 0)} skipped steps.</p>" if tokens else "")
    return (f"<h2>Verdict</h2><p class='summary'>{_e(verdict.summary())}</p>{trained}"
            "<table><tr><th>role</th><th>set</th><th>metric</th><th>base</th><th>trained</th><th>change</th></tr>"
            f"{rows}</table>")


def _data_section(run: RunDir) -> str:
    parts = ["<h2>Data</h2>"]
    packed = sorted(run.packed.glob("*/manifest.json")) if run.packed.is_dir() else []
    if packed:
        parts.append("<table><tr><th>source</th><th>documents</th><th>MB</th><th>tokens</th><th>tokens/byte</th>"
                     "<th>skipped records</th></tr>")
        for path in packed:
            m = read_json(path)
            skipped = sum(m.get("read", {}).get("skipped", {}).values())
            parts.append(f"<tr><td>{_e(m['source'])}</td><td>{m['documents']:,}</td><td>{m['bytes'] / 1e6:.2f}</td>"
                         f"<td>{m['tokens']:,}</td><td>{m['tokens'] / max(m['bytes'], 1):.3f}</td>"
                         f"<td>{skipped}</td></tr>")
        parts.append("</table>")
    for title, paths in (("Curation", sorted(run.curated.glob("*/stats.json")) if run.curated.is_dir() else []),
                         ("Vocabulary", [run.vocab / "stats.json"] if (run.vocab / "stats.json").is_file() else [])):
        for path in paths:
            parts.append(f"<details><summary>{title}: {_e(path.parent.name)}</summary>"
                         f"<pre>{_e(json.dumps(read_json(path), indent=2, ensure_ascii=False))}</pre></details>")
    return "".join(parts) if len(parts) > 1 else ""


def _img(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _e(text: str) -> str:
    return html.escape(str(text))
