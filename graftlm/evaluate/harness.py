"""lm-evaluation-harness in process: the loaded (or training) model scored by lm-eval's own code, offline.

    harness = Harness(config.harness, work_dir, text_field)   # reads and checks every local file
    harness.check()                                           # every task loads offline (else a GraftError)
    harness(model, tokenizer)   # {"graft_xcopa_vi": {"acc", "acc_stderr", "n", "task", "lang", "path"}, ...}

graftlm ships task templates (graftlm/evaluate/tasks/*.yaml) that read local files. For `xcopa:vi=PATH` it writes
`<work_dir>/tasks/graft_xcopa_vi.yaml`, a task that `include:`s the template and names its data file (and, for
XCOPA, the language's connectives; for SIB-200, the topics), beside `<work_dir>/data/graft_xcopa_vi.jsonl`, the
file's records as graftlm's own readers read them (so a bad line is reported by file and line before lm-eval
starts). lm-eval's `TaskManager(include_path=<work_dir>/tasks)` then finds these tasks by name, and the same
folder works with lm-eval's command line: `python -m lm_eval --model hf --model_args pretrained=DIR --tasks
graft_xcopa_vi --include_path <work_dir>/tasks`.

Offline: while lm-eval runs, `datasets` and `huggingface_hub` are switched to offline mode and the datasets cache
is `<work_dir>/cache`, so nothing is downloaded and nothing is written outside the work folder. A task whose data
is not local fails at `check()` with an error that says so. lm-eval seeds Python's, NumPy's and torch's random
generators; their states are put back afterwards, so evaluating during training does not change the training.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import yaml

from graftlm.data.config import SourceConfig
from graftlm.data.read import read_records
from graftlm.errors import DataError, GraftError
from graftlm.evaluate.choice import XCOPA_CONNECTIVES, load_choice_set
from graftlm.evaluate.config import LOCAL_TASKS, HarnessConfig, HarnessTask
from graftlm.runs import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEMPLATES = Path(__file__).resolve().parent / "tasks"
XCOPA_FIELDS = ("premise", "choice1", "choice2", "question", "label")
BOOTSTRAP_ITERS = 1000
"""Bootstrap draws for the stderr of metrics without a closed form (lm-eval's command line uses 100,000; accuracy
and bits per byte never bootstrap)."""


class Harness:
    def __init__(self, config: HarnessConfig, work_dir: str | os.PathLike | None = None, text_field: str = "text"):
        """Read every local task's file and write the task folder; nothing of lm-eval is imported yet.

        `work_dir` holds the generated tasks, their data and the datasets cache (a run passes a folder of its run
        directory); by default a temporary folder, removed when this object is.
        """
        self.config = config
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="graft-harness-")
            weakref.finalize(self, _remove_tree, work_dir)
        self.work_dir = Path(work_dir)
        self.tasks_dir = self.work_dir / "tasks"
        self.cache_dir = self.work_dir / "cache"
        if config.include_path and not os.path.isdir(config.include_path):
            raise GraftError(f"eval.harness.include_path: {config.include_path}: no such folder")
        self.local = {task.result_name: task for task in config.tasks if task.task in LOCAL_TASKS}
        with atomic_dir(self.tasks_dir) as tmp:
            for name, task in self.local.items():
                _write_local_task(task, name, tmp, self.work_dir / "data", text_field)
        self._task_manager = None

    @property
    def names(self) -> list[str]:
        """What each configured task is called in lm-eval (and in the results)."""
        return [task.result_name for task in self.config.tasks]

    def task_manager(self):
        """lm-eval's TaskManager over the generated tasks and `include_path`; lm-eval's own task index (a scan of
        thousands of YAML files, seconds) only when a task is not found there."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            paths = [str(self.tasks_dir)] + ([self.config.include_path] if self.config.include_path else [])
            with _quiet_lm_eval():
                manager = TaskManager(include_path=paths, include_defaults=False)
                if any(name not in manager.all_tasks for name in self.names):
                    manager = TaskManager(include_path=paths)
            for name in self.names:
                if name not in manager.all_tasks:
                    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                    raise GraftError(f"eval.harness.tasks: no lm-eval task named '{name}'"
                                     + (f" (did you mean {', '.join(close)}?)" if close else ""))
            self._task_manager = manager
        return self._task_manager

    def check(self) -> None:
        """Load every task once, offline: a task whose data is not on this machine fails here, before model work."""
        manager = self.task_manager()
        for name in self.names:
            with self._lm_eval_context():
                try:
                    manager.load([name])
                except Exception as e:  # lm-eval and datasets raise many kinds; the task name is what matters
                    raise GraftError(f"eval.harness.tasks: {name}: cannot load its data offline "
                                     f"({_first_line(e)}); graftlm never downloads: use a local task "
                                     f"({', '.join(f'{t}:LANG=PATH' for t in LOCAL_TASKS)}) or a task YAML in "
                                     "include_path whose dataset is a local folder or local data_files") from None

    def __call__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                 on_task: Callable[[str], None] | None = None) -> dict:
        """Run every task on `model` as it is (training mode, precision and random state are put back);
        {task name: {metric: value, metric_stderr: value or None, "n": documents, ...}}; a group adds an entry
        for itself and one for each of its tasks."""
        from lm_eval.evaluator import simple_evaluate

        from graftlm.evaluate.scoring import eval_mode, precision

        manager = self.task_manager()
        device = next(model.parameters()).device
        results: dict = {}
        with self._lm_eval_context(), eval_mode(model), precision("float32", device), _random_state_kept():
            lm = _in_process_lm(model, tokenizer, self.config.batch_size)
            for name in self.names:
                if on_task is not None:
                    on_task(name)
                out = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=self.config.limit,
                                      log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
                results.update(_metrics(out))
                if name in self.local:
                    task = self.local[name]
                    results[name].update(task=task.task, lang=task.lang, path=task.path)
        return results

    @contextlib.contextmanager
    def _lm_eval_context(self) -> Iterator[None]:
        with _offline_datasets(self.cache_dir), _quiet_lm_eval():
            yield


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---- the generated tasks ---------------------------------------------------------------------------------


def _write_local_task(task: HarnessTask, name: str, tasks_dir: Path, data_dir: Path, text_field: str) -> None:
    """`<tasks_dir>/<name>.yaml` including the shipped template, and its data as `<data_dir>/<name>.jsonl`."""
    config: dict = {"include": str(TEMPLATES / f"{task.task}.yaml"), "task": name}
    if task.task == "xcopa":
        records = _xcopa_records(task.path)
        cause, effect = (json.dumps(c, ensure_ascii=False) for c in XCOPA_CONNECTIVES[task.lang])
        config["doc_to_text"] = f"{{{{ premise.strip()[:-1] }}}} {{{{ {cause} if question == \"cause\" else {effect} }}}}"
    elif task.task == "sib200":
        records, topics = _topic_records(task.path, text_field)
        config["doc_to_choice"] = topics
    else:
        source = SourceConfig(paths=[task.path], text_field=text_field, txt_documents="line")
        records = [{"text": record.text} for record in read_records(source)]
        if not records:
            raise DataError(f"{task.path}: no documents (every line is empty)")
    data = data_dir / f"{name}.jsonl"
    _write_jsonl(data, records)
    config["dataset_kwargs"] = {"data_files": {"test": str(data)}}
    header = f"# written by graftlm from {task.task}:{task.lang}={task.path}\n"
    (tasks_dir / f"{name}.yaml").write_text(
        header + yaml.safe_dump(config, allow_unicode=True, sort_keys=False, width=1000), encoding="utf-8")


def _xcopa_records(path: str) -> list[dict]:
    """The raw XCOPA records of a file, after graftlm's own reader has checked every field of every line."""
    from graftlm.data.read import read_json_objects

    load_choice_set(path, "xcopa", "en")  # checks fields, types and labels: a bad line names file and line
    return [{key: obj[key] for key in XCOPA_FIELDS} for _, obj in read_json_objects(path)]


def _topic_records(path: str, text_field: str) -> tuple[list[dict], list[str]]:
    """A SIB-200 .tsv (`text` and `category` columns) as {text, category, label}, and the sorted topics."""
    texts = {r.line: r.text for r in read_records(SourceConfig(paths=[path], text_field=text_field))}
    categories = {r.line: r.text for r in read_records(SourceConfig(paths=[path], text_field="category"))}
    for line in texts:
        if line not in categories:
            raise DataError(f"{path}:{line}: empty 'category'")
    if not texts:
        raise DataError(f"{path}: no documents (every line is empty)")
    topics = sorted(set(categories[line] for line in texts))
    if len(topics) < 2:
        raise DataError(f"{path}: a topic task needs at least two categories, found {', '.join(topics)}")
    return [{"text": texts[line], "category": categories[line], "label": topics.index(categories[line])}
            for line in sorted(texts)], topics


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from graftlm.runs import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---- running lm-eval -------------------------------------------------------------------------------------


def _in_process_lm(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", batch_size: int):
    """lm-eval's HFLM around the model in memory. The tokenizer is a copy (HFLM may give it a pad token), and the
    model's hub revision is not looked up (HFLM would ask the hub for it)."""
    from lm_eval.models.huggingface import HFLM

    class InProcessLM(HFLM):
        def get_model_info(self) -> dict:
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(next(self._model.parameters()).dtype)}

    return InProcessLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _metrics(out: dict) -> dict:
    """lm-eval's `{"results": {task: {"acc,none": .., "acc_stderr,none": ..}}}` as `{task: {"acc": ..,
    "acc_stderr": .., "n": ..}}` (a filter other than `none` stays in the name: `exact_match,strict`)."""
    results = {}
    for task, metrics in out["results"].items():
        entry: dict = {}
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma:
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            entry[name] = None if value == "N/A" else float(value)
        samples = out.get("n-samples", {}).get(task)
        if samples:
            entry["n"] = samples.get("effective")
        results[task] = entry
    return results


@contextlib.contextmanager
def _offline_datasets(cache_dir: Path) -> Iterator[None]:
    """datasets and huggingface_hub offline, and datasets' cache in `cache_dir`, for the duration."""
    import datasets.config as datasets_config
    from huggingface_hub import constants as hub_constants

    saved = (datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE, datasets_config.HF_DATASETS_CACHE,
             hub_constants.HF_HUB_OFFLINE)
    cache_dir.mkdir(parents=True, exist_ok=True)
    datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    datasets_config.HF_DATASETS_CACHE = cache_dir
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE, datasets_config.HF_DATASETS_CACHE,
         hub_constants.HF_HUB_OFFLINE) = saved


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """graftlm shows its own progress: lm-eval's log lines and its and datasets' bars are off for the duration."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [logger.level for logger in loggers]
    modules = (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)  # each did `from tqdm import tqdm`
    bars = [module.tqdm for module in modules]
    bars_were_on = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for module in modules:
        module.tqdm = _silent_bar
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for module, bar in zip(modules, bars):
            module.tqdm = bar
        if bars_were_on:
            datasets.enable_progress_bars()


def _silent_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """simple_evaluate seeds Python's, NumPy's and torch's generators; put back the states they had."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
