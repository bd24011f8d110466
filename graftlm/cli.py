"""The `graft` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from graftlm.errors import GraftError
from graftlm.progress import console, log

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="graftlm: continual pre-training that measures what is gained and what is lost.")
recipe_app = typer.Typer(no_args_is_help=True, help="Look at recipes.")
app.add_typer(recipe_app, name="recipe")

RecipeArg = typer.Argument(None, help="Recipe YAML (default: the bundled demo, recipes/demo-vi.yaml).",
                           show_default=False)
SetOpt = typer.Option([], "--set", "-s", help="Override a recipe key: --set train.lr=1e-4 (repeatable).")
RunsOpt = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are created.")


def _load(recipe: Optional[Path], overrides: List[str]):
    from graftlm.recipe import load_recipe

    return load_recipe(recipe, overrides)


FreshOpt = typer.Option(False, "--fresh", help="Discard the training checkpoints and train from the start again.")


def _run_stages(recipe: Optional[Path], overrides: List[str], runs_dir: Path, stages: tuple[str, ...] | None = None,
                section: str | None = None, hint: str = "", fresh: bool = False, fresh_stage: str = "train"):
    """Load the recipe and bring `stages` (all by default) and the stages they need up to date in its run
    directory; `section` must be in the recipe; `fresh` redoes `fresh_stage`."""
    from graftlm.pipeline import STAGES, run_stages
    from graftlm.runs import RunDir

    loaded = _load(recipe, overrides)
    if section is not None and getattr(loaded, section) is None:
        raise GraftError(f"{section}: the recipe has no {section} section (add one, or --set {hint})")
    run_dir = RunDir.for_recipe(loaded, runs_dir)
    run_stages(loaded, run_dir, stages or tuple(STAGES), options={fresh_stage: {"fresh": fresh}})
    return run_dir


@app.command()
def run(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt,
        fresh: bool = FreshOpt) -> None:
    """Run every stage of a recipe in order into runs/<name>/, skipping stages already complete. A recipe with a
    plan: section is planned first; then the planned recipe is trained (plan.apply: true) or the command that
    trains it is printed (plan.apply: false)."""
    loaded = _load(recipe, set_)
    if loaded.plan is not None:
        from graftlm.plan.stage import next_steps, planned_recipe_path

        run_dir = _run_stages(recipe, set_, runs_dir, ("plan",))
        log(next_steps(run_dir, runs_dir, command=not loaded.plan.apply))
        if not loaded.plan.apply:
            log("run: stopped after the plan (plan.apply: false)")
            return
        recipe, set_ = planned_recipe_path(run_dir), []
        log(f"run: training the planned recipe {recipe} (plan.apply: true)")
    log(f"run: done -> {_run_stages(recipe, set_, runs_dir, fresh=fresh).root}")


@app.command()
def plan(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt,
         fresh: bool = typer.Option(False, "--fresh", help="Train every pilot from the start again.")) -> None:
    """Choose the target share of the mixture and plan the budget: short pilot runs at several shares, a scaling
    law fitted to their curves, the planned recipe in runs/<name>/plan/ (its data prepared first when needed)."""
    from graftlm.plan.stage import next_steps

    run_dir = _run_stages(recipe, set_, runs_dir, ("plan",), "plan", "plan.ratios=[0.5,0.7,0.85,1.0]", fresh,
                          fresh_stage="plan")
    log(next_steps(run_dir, runs_dir))


@app.command()
def prepare(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Export the base model, curate, extend the vocabulary, pack: everything training needs."""
    from graftlm.pipeline import PREPARE_STAGES

    _run_stages(recipe, set_, runs_dir, PREPARE_STAGES)


@app.command()
def curate(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Curate the raw text of the sources: language ID, quality filters, MinHash dedup, rehydration (datatrove)."""
    _run_stages(recipe, set_, runs_dir, ("curate",), "curate", "curate.sources=[vi]")


@app.command()
def vocab(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Extend the vocabulary for the target language (the stages before it run first when needed)."""
    _run_stages(recipe, set_, runs_dir, ("vocab",), "vocab", "vocab.new_tokens=8000")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", help="Anything base_model: accepts, a run's model/ or a checkpoint."),
    text: List[str] = typer.Option([], "--text", help="Held-out text for bits per byte: .txt (a document per line), "
                                   ".tsv (a text column) or .jsonl (repeatable)."),
    choice: List[str] = typer.Option([], "--choice", help="Multiple-choice set: XCOPA or {context, choices, label} "
                                     ".jsonl (repeatable)."),
    harness: List[str] = typer.Option([], "--harness", help="An lm-evaluation-harness task, run in process: "
                                      "TASK:LANG=PATH for a shipped local task (xcopa, sib200, bpb), or an lm-eval "
                                      "task name whose data is local (repeatable)."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="A folder of your own lm-eval task "
                                               "YAMLs."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Documents per lm-eval task (default: all)."),
    generate: List[str] = typer.Option([], "--generate", help="LANG=PATH: sentences (one a line, .txt/.tsv/.jsonl) "
                                       "whose first words the model continues greedily (repeatable)."),
    n: int = typer.Option(32, "--n", min=1, help="Prompts per --generate file."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Tokens generated per prompt."),
    lens: List[str] = typer.Option([], "--lens", help="LANG=PATH: held-out text (one sentence a line) for the logit "
                                   "lens (repeatable)."),
    max_documents: Optional[int] = typer.Option(100, "--max-documents", min=1,
                                                help="Documents per --lens file (default 100)."),
    target: Optional[str] = typer.Option(None, "--target", help="The target language of the lens (default: the "
                                         "first --lens language that is not English)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language of the sets: XCOPA's connectives (default: "
                                       "detected), and per-character fertility for a language without spaces."),
    text_field: str = typer.Option("text", "--text-field", help="The .jsonl field or .tsv column of the text."),
    json_: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8,
                                             help="Context in tokens (default: the model's, at most 2048)."),
    dtype: str = typer.Option("float32", "--dtype",
                              help="float32, bfloat16 (autocast) or auto (bfloat16 where it is the faster)."),
) -> None:
    """Score a model: bits per byte, multiple choice, lm-eval tasks, generations and the logit lens."""
    import json

    from pydantic import ValidationError

    from graftlm.evaluate.config import (ChoiceSetConfig, EvalConfig, GenerateConfig, HarnessConfig, HarnessTask,
                                         LensConfig)
    from graftlm.evaluate.scoring import DTYPES
    from graftlm.evaluate.suite import evaluate_model, results_table

    if not (text or choice or harness or generate or lens):
        raise GraftError("eval: give at least one --text, --choice, --harness, --generate or --lens")
    if dtype not in DTYPES:
        raise GraftError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    from graftlm.languages import UnknownLanguage, normalize_language

    try:
        lang = normalize_language(lang) if lang is not None else None
    except UnknownLanguage as e:
        raise GraftError(f"--lang: {e}") from None
    tasks = []
    for spec in harness:
        try:
            tasks.append(HarnessTask.model_validate(spec))
        except ValidationError as e:
            raise GraftError(f"--harness {spec}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    try:
        harness_config = HarnessConfig(tasks=tasks, include_path=include_path, limit=limit)
    except ValidationError as e:
        raise GraftError(f"--harness: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    config = EvalConfig(text={path: path for path in text}, text_field=text_field, batch_size=batch_size,
                        choice={path: ChoiceSetConfig(path=path, lang=lang) for path in choice},
                        max_length=max_length, dtype=dtype, harness=harness_config,
                        generate=GenerateConfig(prompts=_lang_paths("--generate", generate), n=n,
                                                max_new_tokens=max_new_tokens),
                        lens=LensConfig(text=_lang_paths("--lens", lens), max_documents=max_documents))
    results = evaluate_model(model, config, target=target, languages={path: lang for path in text} if lang else None)
    if json_:
        sys.stdout.write(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    else:
        from rich.console import Console

        Console().print(results_table(results))


def _lang_paths(option: str, values: List[str]) -> dict[str, str]:
    """`vi=data/vi.tsv` options as {"vi": "data/vi.tsv"}; a language given twice is an error."""
    paths: dict[str, str] = {}
    for value in values:
        lang, sep, path = value.partition("=")
        if not sep or not lang or not path:
            raise GraftError(f"{option} {value}: expected LANG=PATH, e.g. {option} vi=sentences.vi.txt")
        if lang in paths:
            raise GraftError(f"{option}: language '{lang}' given twice")
        paths[lang] = path
    return paths


@app.command()
def train(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt,
          fresh: bool = FreshOpt) -> None:
    """Continue pre-training on the recipe's mixture (preparing its data first when needed); resumes from the
    latest checkpoint by itself.

    SIGTERM, SIGUSR1 (Slurm's warning before it kills a job) or Ctrl-C finish the current step, write a checkpoint
    and exit with 128 + the signal's number (143, 138, 130); run the same command again to resume exactly. A second
    signal stops at once (the last checkpoint stays). Exit 2: another graft command is writing into the run."""
    _run_stages(recipe, set_, runs_dir, ("train",), fresh=fresh)


@app.command()
def merge(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Average, interpolate or add a chat vector to the trained model (the recipe's merge: section), and evaluate it
    (training it first when needed)."""
    _run_stages(recipe, set_, runs_dir, ("merge",), "merge", "merge.alpha=0.5")


@app.command()
def compare(recipe: Optional[Path] = RecipeArg,
            vary: List[str] = typer.Option([], "--vary", help="A key and its values: --vary train.method=full,lora "
                                           "(repeatable: a grid of every combination, or pairs with --zip)."),
            zip_: bool = typer.Option(False, "--zip", help="Pair the i-th values of every --vary instead of a grid."),
            set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Train variants of a recipe on the same data and budget; one report of their gains and losses."""
    from graftlm.compare import run_compare

    run_compare(recipe, set_, vary, zip_, runs_dir)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/demo-vi.")) -> None:
    """Rebuild a run's report.html (and its model card) from what the run wrote."""
    from graftlm.report.page import load_run
    from graftlm.report.stage import Report

    loaded, run_dir_ = load_run(run_dir)
    Report(loaded, run_dir_).run(None, "")  # a reader: no timing, nothing else of the run rewritten


@recipe_app.command("show")
def recipe_show(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt) -> None:
    """Print the resolved recipe, every default written out."""
    sys.stdout.write(_load(recipe, set_).to_yaml())


def main() -> None:
    from graftlm.signals import Stopped

    try:
        app()
    except Stopped as e:  # a scheduler's SIGTERM, Ctrl-C: not an error, and the same command continues
        _fail(str(e), e.exit_code, "[bold yellow]stopped:[/]")
    except Exception as e:
        stopped = _stopped_behind(e)
        if stopped is not None:
            _fail(str(stopped), stopped.exit_code, "[bold yellow]stopped:[/]")
        if isinstance(e, GraftError):
            _fail(str(e), e.exit_code)
        if isinstance(e, OSError):  # the machine, not the recipe: a read-only folder, a full disk, a permission
            _fail(describe_os_error(e), 1)
        raise
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


def _stopped_behind(e: BaseException):
    """The `Stopped` that an error replaced while the stop unwound, if any: a library's clean-up that fails because
    the signal also ended its helper processes (datatrove's `finally` talks to a manager process that SIGTERM
    ended, and raises ConnectionResetError instead)."""
    from graftlm.signals import Stopped

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Stopped):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


def _fail(message: str, code: int, label: str = "[bold red]error:[/]") -> None:
    from rich.markup import escape

    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())  # one line, always
    console.print(f"{label} {escape(message)}", soft_wrap=True)
    sys.exit(code)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file, what happened, and for a full disk the space free and needed."""
    import errno
    import os
    import shutil

    where = e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and where is None:
        return "no space left on the disk; free some space and run again"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = os.path.abspath(where)
        while not os.path.isdir(folder) and folder != os.path.dirname(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        needed = getattr(e, "needed_bytes", None)
        return (f"{where}: no space left on the disk ({_size(free)} free in {folder}"
                + (f", about {_size(needed)} needed" if needed else "") + "); free some space and run again")
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
    if e.filename is None:
        return f"{reason} ({type(e).__name__})"
    return f"{where}: {reason}" + (f" (-> {e.filename2})" if e.filename2 else "")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
