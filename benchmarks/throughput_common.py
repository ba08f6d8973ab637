"""What benchmarks/bench_throughput.py and its parts (throughput_teacher, throughput_freezing,
throughput_sft_freezing, throughput_trainer) share: the quick switch, the work folder, the flags every run takes and
the one launcher.

Run: part of `make bench-throughput`; BENCH_QUICK=1 makes every part a smoke run (a few steps, no measurement).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from dsrecipes.launching import DS_YAML, child_env, launch_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("BENCH_QUICK") == "1"
WORK = os.path.join(ROOT, "outputs", "bench_throughput")
ZERO2 = "configs/deepspeed/zero2.json"
S = lambda full, quick: quick if QUICK else full
COMMON = [
    "--report_to",
    "none",
    "--logging_steps",
    "5",
    "--save_steps",
    "0",
    "--per_device_train_batch_size",
    "8",
    "--block_size",
    "128",
]


def launch(name: str, script: str, args: list[str], nproc: int = 1, deepspeed: str = ZERO2) -> dict:
    """accelerate launch one run into WORK/name (dsrecipes.launching: a free port, 1 thread per rank); returns its
    summary.json."""
    out = os.path.join(WORK, name)
    shutil.rmtree(out, ignore_errors=True)
    cmd = launch_cmd(script, [*args, "--output_dir", out], DS_YAML, deepspeed=deepspeed, num_processes=nproc)
    env = child_env(PYTHONPATH=os.path.join(ROOT, "src"))
    t0, cpu0 = time.time(), _children_cpu()
    with open(out + ".log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}); see {out}.log")
    cpu = _children_cpu() - cpu0
    print(f"  {name}: {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    with open(os.path.join(out, "summary.json")) as fh:
        return dict(json.load(fh), run_cpu_s=cpu)


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the launcher and its ranks): the work a run did, which other jobs
    on the machine do not inflate the way they inflate wall clock."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def read_json(path: str):
    """The JSON at `path`, or None where there is no file."""
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
