"""Run outputs every recipe writes: output_dir/metrics.jsonl (one JSON line per logged step) and summary.json.

log = RunLog(output_dir, enabled=accelerator.is_main_process)
log.write({"step": 10, "loss": 2.1})     # appended and flushed at once (survives a kill)
log.summary({...})                       # summary.json, written atomically
"""

from __future__ import annotations

import json
import math
import os

from dsrecipes.train.checkpoints import write_json_atomic


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class RunLog:
    def __init__(self, output_dir: str, enabled: bool = True, resume_step: int = 0, keep_lines: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.summary_path = os.path.join(output_dir, "summary.json")
        self.lines = 0  # lines in the file (main process): a checkpoint records it as the resume point of the log
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.lines = self._truncate(resume_step, keep_lines)

    def _truncate(self, step: int, keep_lines: int | None) -> int:
        """On resume keep the first keep_lines lines (the count the checkpoint recorded; a run of several phases
        restarts its step count per phase), else the lines up to the checkpoint's step, so the file reads like one
        straight run. Returns the number of lines kept."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as fh:
            lines = [ln for ln in fh if ln.strip()]
        if keep_lines is not None:
            keep = lines[:keep_lines]
        else:
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(keep)
        os.replace(self.path + ".tmp", self.path)
        return len(keep)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.lines += 1
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()

    def summary(self, record: dict) -> None:
        if self.enabled:
            write_json_atomic(self.summary_path, record)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]
