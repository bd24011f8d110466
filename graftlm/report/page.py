"""`graft report RUN_DIR`: one self-contained HTML page for a run, a model card for its model, and the verdict
table in the terminal.

The page holds the verdict (target gain, source loss), the curves (loss and lr, bits per byte and accuracy over
training with the base level drawn, tokens per source), lm-evaluation-harness results beside graftlm's own, the
generations (language rates and a side-by-side sample) and the logit lens of the start and the trained model, the
data each stage produced, and the recipe. Figures are embedded as base64 PNG, so the page is one file that can be
mailed or archived.
"""

from __future__ import annotations

import base64
import html
import os
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
th { background: #f4f4f4; } .name { text-align: left; }
.better { color: #1e7e34; font-weight: 600; } .worse { color: #b02a37; font-weight: 600; }
.summary { background: #f7f7f2; border-left: 4px solid #8a8; padding: 0.6em 1em; }
img { max-width: 100%; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #777; font-size: 0.9em; }
.samples td { text-align: left; vertical-align: top; max-width: 22em; }
"""
SAMPLES_SHOWN = 8
"""Continuations shown side by side per language (all of them are in metrics.jsonl)."""


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
    training = run.training_summary()
    training["target_bytes_per_s"] = target_bytes_per_s(recipe, run, training)
    sections = [
        f"<h1>graftlm run: {_e(recipe.name)}</h1>",
        f"<p class='muted'>base model {_e(recipe.base_model)} · {_e(str(run.root))}</p>",
        _verdict_section(verdict, training, read_json(run.timings) if run.timings.is_file() else {}, metrics),
        "<h2>Curves</h2>" + "".join(embed_png(f) for f in figures if f) if any(figures) else "",
        _harness_section(recipe, metrics),
        _generate_section(metrics),
        _lens_section(metrics),
        _data_section(run),
        f"<h2>Recipe</h2><details><summary>the resolved recipe</summary><pre>{_e(recipe.to_yaml())}</pre></details>",
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
              f"{recipe.train.schedule.name} schedule), {training.get('elapsed_s', 0):.0f} s of training"
              + (f" ({training['target_bytes_per_s']:,.0f} bytes of {recipe.target_language} text a second)"
                 if training.get("target_bytes_per_s") else "") + ".", ""]
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


def target_bytes_per_s(recipe: Recipe, run: RunDir, training: dict) -> float | None:
    """Training throughput in UTF-8 bytes of target-language text per second: the tokens read from each source of
    the target language, times that packed source's bytes per token (its manifest), over the seconds of training.
    Unlike tokens per second it does not flatter a tokenizer that cuts the text finer, so a vocabulary extension's
    gain in speed shows. None when the run has not trained or has no target source."""
    read, seconds = training.get("tokens_by_source") or {}, training.get("elapsed_s")
    total = 0.0
    for name in recipe.target_sources():
        manifest = run.packed / name / "manifest.json"
        if read.get(name) and manifest.is_file():
            packed = read_json(manifest)
            total += read[name] * packed["bytes"] / max(packed["tokens"], 1)
    return total / seconds if total and seconds else None


def _verdict_section(verdict: Verdict | None, training: dict, timings: dict, metrics: list[dict]) -> str:
    if verdict is None:
        return "<h2>Verdict</h2><p>Not evaluated yet: the verdict needs the base and a trained evaluation.</p>"
    tokens = training.get("tokens")
    elapsed = training.get("elapsed_s")
    speed = f" · {tokens / elapsed:,.0f} tokens/s" if tokens and elapsed else ""
    if training.get("target_bytes_per_s"):
        speed += f" · {training['target_bytes_per_s']:,.0f} bytes of {_e(verdict.target)} text/s"
    trained = (f"<p>{tokens:,} tokens in {training.get('step')} steps, {elapsed:,.0f} s of training{speed}; "
               f"{training.get('skipped_steps', 0)} skipped steps.</p>" if tokens else "")
    trained += _utilisation(metrics)
    if timings:
        trained += f"<p>Wall time {wall_time(timings)} (training includes its evaluations).</p>"
    rows = [row[:5] + ((row[5], row[5].split()[-1]),) for row in verdict_rows(verdict)]
    return (f"<h2>Verdict</h2><p class='summary'>{_e(verdict.summary())}</p>{trained}"
            + html_table(("role", "set", "metric", "base", "trained", "change"), rows, text_columns=3))


def _utilisation(metrics: list[dict]) -> str:
    """The median MFU of the training steps and the largest peak memory of any process."""
    steps = [r for r in metrics if "loss" in r]
    mfus = sorted(r["mfu"] for r in steps if r.get("mfu") is not None)
    memory = [m for r in steps for m in r.get("memory_gib") or []]
    parts = ([f"model FLOPs utilisation {mfus[len(mfus) // 2]:.1%} (median of the steps; 6·N + attention FLOPs "
              "per token against the devices' bf16 peak)"] if mfus else []) + \
        ([f"peak memory {max(memory):.2f} GiB per process"] if memory else [])
    return f"<p>{_e('; '.join(parts))}.</p>" if parts else ""
def first_and_last(metrics: list[dict], key: str) -> tuple[dict, dict] | None:
    """The first and the last evaluation record that hold `key` ("harness", "generate", "lens"): the start model
    and the trained one. None unless there are two."""
    from graftlm.report.verdict import eval_records

    records = [r for r in eval_records(metrics) if key in r["eval"]]
    return (records[0], records[-1]) if len(records) >= 2 else None


def _harness_section(recipe: Recipe, metrics: list[dict]) -> str:
    """lm-eval's numbers (± its stderr) at the start and the end, beside graftlm's own on the same file."""
    from graftlm.evaluate.suite import harness_metrics

    pair = first_and_last(metrics, "harness")
    if pair is None:
        return ""
    first, last = pair
    rows = []
    for name, result in last["eval"]["harness"].items():
        start = first["eval"]["harness"].get(name, {})
        own = _graftlm_own(recipe, result, first, last)
        for metric, value in harness_metrics(result):
            before = start.get(metric)
            change = "" if before is None else f"{value - before:+.4f}"
            rows.append((name, metric, _with_stderr(before, start.get(f"{metric}_stderr")),
                         _with_stderr(value, result.get(f"{metric}_stderr")), change, own, str(result.get("n", ""))))
    return ("<h2>lm-evaluation-harness</h2><p>lm-eval's own scoring, run in process on the model at the start "
            f"(step {first['step']}) and at the end (step {last['step']}); ± lm-eval's standard error. graftlm's "
            "own number on the same file is beside it (its during-training subset: see n in the curves).</p>"
            + html_table(("task", "metric", "start", "trained", "change", "graftlm's own (start → trained)", "n"),
                         rows, text_columns=2))


def _graftlm_own(recipe: Recipe, result: dict, first: dict, last: dict) -> str:
    """graftlm's accuracy (XCOPA) or bits per byte (bpb) on the file a shipped lm-eval task read, if it scored it."""
    path = result.get("path")
    if not path:
        return ""
    same = os.path.realpath(path)
    if result.get("task") == "xcopa":
        names = [n for n, c in recipe.eval.choice.items() if os.path.realpath(c.path) == same]
        kind, key = "choice", "accuracy"
    elif result.get("task") == "bpb":
        names = [n for n, p in recipe.eval.text.items() if os.path.realpath(p) == same]
        kind, key = "text", "bpb"
    else:
        return ""
    for name in names:
        if name in first["eval"][kind] and name in last["eval"][kind]:
            return f"{name}: {first['eval'][kind][name][key]:.4f} → {last['eval'][kind][name][key]:.4f}"
    return ""


def _with_stderr(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _generate_section(metrics: list[dict]) -> str:
    """The language rates of the greedy continuations at the start and the end, and a sample side by side."""
    pair = first_and_last(metrics, "generate")
    if pair is None:
        return ""
    first, last = pair
    rows, samples = [], []
    for lang, trained in last["eval"]["generate"].items():
        start = first["eval"]["generate"].get(lang)
        for label, result in (("start", start), ("trained", trained)):
            if result is not None:
                languages = ", ".join(f"{code} {count}" for code, count in list(result["languages"].items())[:4])
                rows.append((lang, label, f"{result['same_language']:.0%}", f"{result['mixed']:.0%}",
                             _number(result["distinct_2"]), languages, str(result["n"])))
        if start is not None:
            samples.append(_samples_table(lang, start["samples"], trained["samples"]))
    return ("<h2>Generations</h2><p>Greedy continuations of the first words of held-out sentences. <i>Same "
            "language</i>: continuations in the prompt's language; <i>mixed</i>: continuations whose sentences are "
            "in more than one language (language mixing); <i>distinct-2</i>: distinct token bigrams over all of a "
            "continuation's (lower: more repetition). Languages named by the curation stage's identifier.</p>"
            + html_table(("prompts", "model", "same language", "mixed", "distinct-2", "languages of the "
                          "continuations", "n"), rows, text_columns=2, last_text=True)
            + "".join(samples))


def _samples_table(lang: str, start: list[dict], trained: list[dict]) -> str:
    by_line = {s["line"]: s for s in trained}
    rows = []
    for sample in start[:SAMPLES_SHOWN]:
        other = by_line.get(sample["line"])
        if other is None:
            continue
        rows.append("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in (
            sample["prompt"], f"{sample['continuation']} [{sample['language']}]",
            f"{other['continuation']} [{other['language']}]")) + "</tr>")
    return (f"<h3>Continuations of {_e(lang)} prompts (start | trained)</h3><table class='samples'><tr>"
            "<th class='name'>prompt</th><th class='name'>start model</th><th class='name'>trained model</th></tr>"
            + "".join(rows) + "</table>")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _lens_section(metrics: list[dict]) -> str:
    pair = first_and_last(metrics, "lens")
    if pair is None:
        return ""
    first, last = pair
    figure = plots.logit_lens(first["eval"]["lens"], last["eval"]["lens"])
    if figure is None:
        return ""
    counted = next(iter(last["eval"]["lens"].values())).get("token_languages", "token counts")
    return ("<h2>Logit lens</h2><p>Each layer's hidden state through the model's final norm and output head: the "
            "bits per byte it would give the actual next token, and the language of its top-1 token (a token "
            f"belongs to a language when it is frequent in that language's text and rare in the others', counted in "
            f"{_e(counted)}), for the start model (step {first['step']}, dotted) and the trained one "
            f"(step {last['step']}, solid).</p>" + embed_png(figure))


def _data_section(run: RunDir) -> str:
    parts = []
    manifests = [read_json(p) for p in sorted(run.packed.glob("*/manifest.json"))] if run.packed.is_dir() else []
    if manifests:
        parts.append("<h3>Packed training data</h3>" + html_table(
            ("source", "documents", "MB", "tokens", "tokens/byte", "skipped records"),
            [(m["source"], f"{m['documents']:,}", f"{m['bytes'] / 1e6:.2f}", f"{m['tokens']:,}",
              f"{m['tokens'] / max(m['bytes'], 1):.3f}", str(sum(m.get("read", {}).get("skipped", {}).values())))
             for m in manifests]))
    for path in sorted(run.curated.glob("*/stats.json")) if run.curated.is_dir() else []:
        parts.append(_curation(read_json(path)))
    if (run.vocab / "stats.json").is_file():
        parts.append(_vocabulary(read_json(run.vocab / "stats.json")))
    return "<h2>Data</h2>" + "".join(parts) if parts else ""


def _curation(stats: dict) -> str:
    """What each curation step kept and dropped, and why."""
    rows = [(s["step"], f"{s.get('documents_in', s['documents_out']):,}", f"{s['documents_out']:,}",
             f"{s['bytes_out'] / 1e6:.2f}",
             ", ".join(f"{reason} {count}" for reason, count in sorted(s.get("dropped", {}).items())))
            for s in stats["steps"]]
    clusters = ", ".join(f"{size}: {count}" for size, count in stats.get("cluster_sizes", {}).items())
    return (f"<h3>Curation of {_e(stats['source'])}</h3><p>{stats['input']['documents']:,} documents in, "
            f"{stats['output']['documents']:,} out ({stats['output']['bytes'] / 1e6:.2f} MB) in "
            f"{stats['seconds']['total']:.1f} s; duplicate-cluster sizes (size: clusters): {_e(clusters) or '-'}.</p>"
            + html_table(("step", "documents in", "documents out", "MB out", "dropped (reason count)"), rows,
                     text_columns=1, last_text=True))


def _vocabulary(stats: dict) -> str:
    """Tokens per word (per character for a language without spaces) and per byte on each language's held-out
    text, before and after the extension."""
    rows = []
    for lang, f in stats["fertility"].items():
        unit = f.get("unit", "word")  # runs from before per-character fertility hold words only
        rows.append((lang, f"tokens per {unit}", f"{f['before'][f'tokens_per_{unit}']:.3f}",
                     f"{f['after'][f'tokens_per_{unit}']:.3f}", f"{f['before']['tokens_per_byte']:.4f}",
                     f"{f['after']['tokens_per_byte']:.4f}", f"{f['identical_documents']:.1%}"))
    replay = stats.get("replay") or {}
    protected = (f" Replay protection on {', '.join(map(_e, replay['sources']))} ({replay['bytes'] / 1e6:.1f} MB): "
                 f"{stats['skipped'].get('changes_replay', 0):,} candidates skipped, "
                 f"{replay['changed_share']:.3%} of its words tokenised differently."
                 if replay.get("words") else "")
    untied = f" Output rows untied (new ones: {_e(stats['output_init'])})." if stats.get("untied") else ""
    page = (f"<h3>Vocabulary extension</h3><p>{stats['new_tokens']:,} new tokens (of {stats['requested']:,} asked "
            f"for) learned from '{_e(stats['source'])}' ({stats['family']}), new rows initialised by "
            f"{_e(stats['init'])}.{untied}{protected} Examples: {_e(' '.join(stats['examples'][:20]))}</p>"
            + html_table(("language", "fertility", "before", "after", "tokens/byte before", "after",
                          "documents tokenised as before"), rows, text_columns=2))
    step0 = stats.get("bpb_before_training") or {}
    if step0:
        sets = list(step0["base"])
        page += ("<p>Bits per byte before any training: the unextended base, and the extended model under each "
                 "way of starting the new rows (this run uses " + _e(stats["init"]) + ").</p>"
                 + html_table(("model", *sets),
                              [(name, *(f"{bpb[s]:.4f}" for s in sets)) for name, bpb in step0.items()]))
    return page


def html_table(headers: tuple[str, ...], rows, text_columns: int = 1, last_text: bool = False) -> str:
    """An HTML table; the first `text_columns` (and, with `last_text`, the last) are left-aligned text. A cell may be
    a (text, css class) pair."""
    def cell(value, index: int, width: int) -> str:
        text, css = value if isinstance(value, tuple) else (value, "")
        if index < text_columns or (last_text and index == width - 1):
            css = f"{css} name".strip()
        return f"<td class='{css}'>{_e(text)}</td>" if css else f"<td>{_e(text)}</td>"

    head = "".join(f"<th class='name'>{_e(h)}</th>" if i < text_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(v, i, len(row)) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def wall_time(timings: dict[str, float]) -> str:
    """`9.0 min: base 19 s, curate 10 s, ...` from timings.json (stages under half a second left out)."""
    stages = ", ".join(f"{stage} {seconds:,.0f} s" for stage, seconds in timings.items() if seconds >= 0.5)
    return f"{sum(timings.values()) / 60:.1f} min: {stages}"


def embed_png(png: bytes) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _e(text: str) -> str:
    return html.escape(str(text))
