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


@app.command()
def run(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Run every stage of a recipe in order into runs/<name>/, skipping stages already complete."""
    from graftlm.pipeline import run_stages
    from graftlm.runs import RunDir

    loaded = _load(recipe, set_)
    run_dir = RunDir.for_recipe(loaded, runs_dir)
    run_stages(loaded, run_dir)
    log(f"run: done -> {run_dir.root}")


@app.command()
def prepare(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt, runs_dir: Path = RunsOpt) -> None:
    """Export the base model and pack the training text: everything training needs."""
    from graftlm.pipeline import PREPARE_STAGES, run_stages
    from graftlm.runs import RunDir

    loaded = _load(recipe, set_)
    run_stages(loaded, RunDir.for_recipe(loaded, runs_dir), PREPARE_STAGES)


@recipe_app.command("show")
def recipe_show(recipe: Optional[Path] = RecipeArg, set_: List[str] = SetOpt) -> None:
    """Print the resolved recipe, every default written out."""
    sys.stdout.write(_load(recipe, set_).to_yaml())


def main() -> None:
    try:
        app()
    except GraftError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
