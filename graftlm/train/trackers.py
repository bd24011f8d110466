"""Experiment trackers (`report.trackers`): TensorBoard, Weights & Biases, trackio, MLflow, fed by the trainer.

Every record the trainer logs (each step's, each evaluation's) goes to every tracker as flat scalars at its step:
`loss`, `lr`, `grad_norm`, `tokens_per_s`, `tokens_by_source/vi`, `eval/text/vi/bpb`, `eval/choice/xcopa_vi/accuracy`,
and `ema/...` for the evaluation of the moving average. The resolved recipe is the run's config. Trackers write
under runs/<name>/trackers/ by default and never need a network: W&B runs offline, trackio locally, MLflow into a
file store.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from graftlm.errors import RecipeError
from graftlm.runs import flatten
from graftlm.train.trainer import Callback, Trainer

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""The package each tracker needs (the extra of the same name installs it)."""


def check_trackers(names: list[str]) -> None:
    """Fail before any work when a tracker's package is missing."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RecipeError(f"report.trackers: {name} needs the package {PACKAGES[name]}: "
                              f"pip install 'graftlm[{name}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as flat `a/b/c` scalars (its step and tokens, and non-numbers, left out)."""
    prefix = f"{record['model']}/" if "model" in record else ""
    flat = flatten({k: v for k, v in record.items() if k not in ("step", "tokens", "model")}, sep="/")
    return {prefix + key: float(value) for key, value in flat.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class Trackers(Callback):
    """Opens the recipe's trackers on the main process, logs every record to each, closes them at the end."""

    def __init__(self, names: list[str], folder: Path, run_name: str, config: dict):
        self.names, self.folder, self.run_name, self.config = names, folder, run_name, config
        self.open: list[Any] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.open = [OPENERS[name](self.folder, self.run_name, self.config) for name in self.names]

    def on_log(self, trainer: Trainer, record: dict) -> None:
        values = scalars(record)
        for tracker in self.open:
            tracker.log(values, record["step"])

    def on_close(self, trainer: Trainer) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []


class _TensorBoard:
    def __init__(self, folder: Path, run_name: str, config: dict):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.writer.add_text("recipe", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, folder: Path, run_name: str, config: dict):
        import wandb

        self.run = wandb.init(project="graftlm", name=run_name, dir=str(folder), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, folder: Path, run_name: str, config: dict):
        os.environ.setdefault("TRACKIO_DIR", str(folder / "trackio"))  # read when trackio is imported
        import trackio

        self.trackio = trackio
        trackio.init(project="graftlm", name=run_name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _MLflow:
    def __init__(self, folder: Path, run_name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})  # MLflow's value limit

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}
