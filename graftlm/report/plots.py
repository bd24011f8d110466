"""The report's figures, drawn with matplotlib from metrics.jsonl and returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from matplotlib.ticker import FuncFormatter  # noqa: E402

from graftlm.languages import same_language  # noqa: E402
from graftlm.report.verdict import eval_records  # noqa: E402

TARGET_COLOR, SOURCE_COLOR = "#c0392b", "#2e6da4"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def loss_and_lr(metrics: list[dict]) -> bytes | None:
    steps = [r for r in metrics if "loss" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    tokens = [r["tokens"] for r in steps]
    losses = [r["loss"] if r["loss"] is not None else float("nan") for r in steps]
    ax.plot(tokens, losses, color="#bbb", linewidth=1, label="training loss")
    ax.plot(tokens, _smoothed(losses), color="#333", label="smoothed")
    _tokens_axis(ax, "tokens")
    ax.set_ylabel("loss (nats/token)")
    lr_axis = ax.twinx()
    lr_axis.plot(tokens, [r["lr"] for r in steps], color="#999", linestyle="--", label="learning rate")
    lr_axis.set_ylabel("learning rate")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)
    ax.set_title("Training loss and learning rate")
    return _png(fig)


def _smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it)."""
    smoothed, average, seen = [], 0.0, 0
    for value in values:
        if value == value:  # NaN (a skipped step) keeps the previous value
            seen += 1
            average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**seen) if seen else float("nan"))
    return smoothed


def eval_curves(metrics: list[dict], kind: str, target: str, langs: dict[str, str]) -> bytes | None:
    """One panel per set: bits per byte (kind="text") or accuracy (kind="choice") over training tokens, with the
    base model's level drawn — the stability-gap curve."""
    records = eval_records(metrics)
    names = list(records[0]["eval"][kind]) if records else []
    if len(records) < 2 or not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    key = "bpb" if kind == "text" else "accuracy"
    for ax, name in zip(axes[0], names):
        # the curve follows the training's weights; an exported model (EMA, merged) is a point of its own
        points = [(r["tokens"], r["eval"][kind][name][key]) for r in records
                  if name in r["eval"][kind] and "model" not in r]
        color = TARGET_COLOR if same_language(langs.get(name, name), target) else SOURCE_COLOR
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3, color=color)
        if kind == "choice":  # small sets are noisy: draw the 95% interval around each point
            bands = [(r["tokens"], *r["eval"][kind][name]["ci95"]) for r in records
                     if name in r["eval"][kind] and "model" not in r]
            ax.fill_between([b[0] for b in bands], [b[1] for b in bands], [b[2] for b in bands], color=color,
                            alpha=0.12, linewidth=0, label="95% CI")
        ax.axhline(points[0][1], color="#777", linestyle=":", linewidth=1, label="base")
        for r in records:
            if "model" in r and name in r["eval"][kind]:
                ax.plot(r["tokens"], r["eval"][kind][name][key], marker="*", markersize=10, linestyle="none",
                        color="#e0a800" if r["model"] == "merged" else "#6c4", label=r["model"])
        ax.set_title(name if len(name) < 40 else "…" + name[-38:], fontsize=9)
        _tokens_axis(ax, "tokens")
        ax.set_ylabel("bits per byte" if kind == "text" else "accuracy")
        ax.legend(fontsize=7)
    fig.suptitle("Bits per byte during training (lower is better)" if kind == "text"
                 else "Multiple-choice accuracy during training", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def logit_lens(base: dict, trained: dict) -> bytes | None:
    """The logit lens of the start model (dashed) and the trained one (solid): per lens language, bits per byte of
    the next token by layer, and the share of top-1 tokens of the target language and of English by layer."""
    langs = [lang for lang in trained if lang in base]
    if not langs:
        return None
    fig, axes = plt.subplots(len(langs), 2, figsize=(9, 3.0 * len(langs)), squeeze=False)
    target = next((r.get("target") for r in trained.values() if r.get("target")), None)
    for row, lang in zip(axes, langs):
        for result, style, label in ((base[lang], ":", "start"), (trained[lang], "-", "trained")):
            row[0].plot(result["layers"], result["bpb"], linestyle=style, color="#333", label=label)
            for key, color, name in (("target_share", TARGET_COLOR, target or "target"),
                                     ("english_share", SOURCE_COLOR, "en")):
                if result.get(key) is not None:
                    row[1].plot(result["layers"], result[key], linestyle=style, color=color, label=f"{name}, {label}")
        row[0].set_yscale("log")
        row[0].set_ylabel("bits per byte (log)")
        row[0].set_title(f"{lang} text: next-token bits per byte under the lens", fontsize=9)
        row[1].set_ylim(0, 1)
        row[1].set_ylabel("share of top-1 tokens")
        row[1].set_title(f"{lang} text: language of the lens's top-1 token", fontsize=9)
        for ax in row:
            ax.set_xlabel("layer (0: embeddings)")
            ax.legend(fontsize=7)
    fig.suptitle(f"Where does {target or 'the target language'} appear in the depth? (logit lens)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def tokens_by_source(metrics: list[dict]) -> bytes | None:
    steps = [r for r in metrics if "tokens_by_source" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(steps[-1]["tokens_by_source"])
    ax.stackplot([r["tokens"] for r in steps], *[[r["tokens_by_source"].get(n, 0) for r in steps] for n in names],
                 labels=names, alpha=0.8)
    _tokens_axis(ax, "tokens trained")
    ax.set_ylabel("tokens per source")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Tokens seen per source")
    return _png(fig)


def _tokens_axis(ax, label: str) -> None:
    """Token counts as 20k, 1.5M: six-digit tick labels run into each other on a small panel."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if abs(x) >= 1e6
                                               else f"{x / 1e3:g}k" if x else "0"))


LEGEND_LINE_INCHES = 0.2


def variant_colors(variants: list[str]) -> dict[str, str]:
    """One colour per `graft compare` variant, the same in every figure of the comparison."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(variants)}


def _legend_below(fig, ax) -> None:
    """Variant names are long: one legend under the figure (a line each) instead of one over the curves."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (LEGEND_LINE_INCHES * len(labels) + 0.1) / fig.get_figheight(), 1, 1))


def compare_curves(runs: dict[str, list[dict]], kind: str = "text") -> bytes | None:
    """`graft compare`: one panel per evaluation set, one curve per variant (bits per byte or accuracy over
    training tokens), each variant's exported model (EMA, merged) as a star at its end."""
    key = "bpb" if kind == "text" else "accuracy"
    names = list(dict.fromkeys(name for metrics in runs.values() for r in eval_records(metrics)
                               for name in r["eval"][kind]))
    if not names:
        return None
    colors = variant_colors(list(runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4 + LEGEND_LINE_INCHES * len(runs)), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant, metrics in runs.items():
            records = [r for r in eval_records(metrics) if name in r["eval"][kind]]
            curve = [(r["tokens"], r["eval"][kind][name][key]) for r in records if "model" not in r]
            ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", markersize=3, color=colors[variant],
                    label=variant)
            for r in records:
                if "model" in r:
                    ax.plot(r["tokens"], r["eval"][kind][name][key], marker="*", markersize=10,
                            color=colors[variant])
        ax.set_title(name if len(name) < 40 else "…" + name[-38:], fontsize=9)
        _tokens_axis(ax, "tokens")
        ax.set_ylabel("bits per byte" if kind == "text" else "accuracy")
    fig.suptitle("Bits per byte by variant (lower is better; ★ the exported model)" if kind == "text"
                 else "Multiple-choice accuracy by variant", fontsize=10)
    _legend_below(fig, axes[0][0])
    return _png(fig)


def pareto_scatter(points: dict[str, tuple[float, float]], front: set[str],
                   colors: dict[str, str] | None = None) -> bytes | None:
    """Final target-language bits per byte (down is better) against source-language (left is better), the
    variants on the Pareto front ringed in black."""
    if not points:
        return None
    colors = colors or variant_colors(list(points))
    fig, ax = plt.subplots(figsize=(5.5, 4.2 + LEGEND_LINE_INCHES * len(points)))
    for name, (source, target) in points.items():
        on_front = name in front
        ax.plot(source, target, marker="o", markersize=9 if on_front else 6, linestyle="none", color=colors[name],
                markeredgecolor="black" if on_front else colors[name], markeredgewidth=1.5, label=name)
    ax.set_xlabel("source-language bits per byte at the end (← better)")
    ax.set_ylabel("target-language bits per byte at the end (↓ better)")
    ax.set_title("Gain against loss (ringed: the Pareto front)", fontsize=10)
    _legend_below(fig, ax)
    return _png(fig)
