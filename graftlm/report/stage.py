"""The `report` stage: runs/<name>/report.html and the model card from what the run wrote, and the verdict on the
terminal. It reads whatever the other stages left, so it runs every time and depends on none of them."""

from __future__ import annotations

from graftlm.progress import console, log
from graftlm.report.page import build_report, verdict_table, wall_time
from graftlm.runs import read_json
from graftlm.stage import Stage


class Report(Stage):
    name = "report"
    outputs = ("report",)

    def run(self, unit, key):
        run = self.run_dir
        verdict = build_report(self.recipe, run)
        console.print(verdict_table(verdict))
        if verdict is not None:
            log(verdict.summary())
        trained = run.training_summary()
        if trained:
            timings = read_json(run.timings) if run.timings.is_file() else {}
            log(f"tokens trained: {trained['tokens']:,}; wall time {wall_time(timings)}")
        log(f"report: {run.report}")
