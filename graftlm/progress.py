"""Progress bars and messages on the terminal (stderr), so stdout stays clean for `--json` output."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """Print a plain message (brackets in paths and values are not rich markup)."""
    if os.environ.get("RANK", "0") == "0":  # one voice when several processes train together
        console.print(message, soft_wrap=True, markup=False)


def bytes_progress() -> Progress:
    """A bar over bytes of text, with MB done, MB/s and ETA."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)


def steps_progress(show: bool = True) -> Progress:
    """A bar over steps, with a `status` field (loss, rate) shown after it; `show=False` for non-main processes."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}", markup=False),
                    console=console, transient=False, disable=not show)
