"""Shared test helpers: run recipes for real (accelerate launch or plain python) on tiny inputs.

Run: make test   (or .venv/bin/python -m pytest tests -q)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ACCELERATE = os.path.join(BIN, "accelerate")
DS_YAML = "configs/accelerate/deepspeed_cpu_2proc.yaml"
TINY = "configs/recipes/train_tiny_zero2.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
    )
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # the venv's ninja builds DeepSpeed ops (one ninja only)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch_cmd(
    script: str,
    args: list[str],
    accelerate_config: str = DS_YAML,
    deepspeed: str | None = None,
    num_processes: int | None = None,
) -> list[str]:
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        accelerate_config,
        "--main_process_port",
        str(free_port()),
        "--num_cpu_threads_per_process",
        "1",
    ]
    if deepspeed:
        cmd += ["--deepspeed_config_file", deepspeed]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + [script] + args


def run(cmd: list[str], timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_curve(output_dir: str) -> list[tuple[int, float, int]]:
    """(step, loss, data_sum) of every logged training step."""
    return [
        (r["step"], r["loss"], r["data_sum"])
        for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
        if "loss" in r
    ]


def summary(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "summary.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def root() -> str:
    return ROOT
