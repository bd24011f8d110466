"""Progress bars and messages on the terminal (stderr), so stdout stays clean for `--json` output."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    console.print(message)


def bytes_progress() -> Progress:
    """A bar over bytes of text, with MB done, MB/s and ETA."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)


def steps_progress() -> Progress:
    """A bar over steps, with the fields a task sets (`loss`, `rate`) shown after it."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, transient=False)
