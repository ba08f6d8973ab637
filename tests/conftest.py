"""Shared test helpers: run recipes for real (accelerate launch or plain python) on tiny inputs. The launcher itself
(free_port, child_env, launch_cmd, run) lives in dsrecipes.launching, shared with benchmarks/; re-exported here.

Run: make test   (or .venv/bin/python -m pytest tests -q)
"""

from __future__ import annotations

import json
import os

import pytest

from dsrecipes.launching import (  # noqa: F401  (re-exported: tests import these from conftest)
    ACCELERATE,
    BIN,
    DS_YAML,
    ROOT,
    child_env,
    free_port,
    launch_cmd,
    run,
    torchrun_cmd,
)

TINY = "configs/recipes/train_tiny_zero2.yaml"
TINY_RUN = {  # the short tiny-model run most launch tests share: 8 steps, logged every step, a small corpus
    "max_steps": 8,
    "logging_steps": 1,
    "eval_steps": 4,
    "save_steps": 4,
    "report_to": "none",
    "per_device_train_batch_size": 4,
    "generated_docs": 300,
    "eval_docs": 40,
    "warmup_steps": 2,
}


def tiny_run(config: str = TINY, **overrides) -> list[str]:
    """Recipe flags for TINY_RUN (`--config` first), with `overrides` replacing or adding values in place."""
    flags = ["--config", config]
    for key, value in {**TINY_RUN, **overrides}.items():
        flags += [f"--{key}", str(value)]
    return flags


# A valid DeepSpeed JSON with every value left to "auto" (tests/test_check.py, tests/test_bad_configs.py).
DS_OK = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2},
}


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


@pytest.fixture(scope="module")  # tests/test_memory.py, tests/test_zero_init.py
def ds_world():
    """DeepSpeed's communication in this process (a world of one), once per module. The rendezvous variables are
    put back as soon as it is up (a child process launched with them would try this process's MASTER_PORT); the
    tests that use DeepSpeed get them through ds_comm."""
    import deepspeed
    import torch.distributed as dist

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield env
    dist.destroy_process_group()
    import deepspeed.comm.comm as ds_comm_mod

    ds_comm_mod.cdb = None
