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

# What `make test` exports (Makefile), set here too (before any test module imports huggingface_hub), so that a bare
# `pytest tests` behaves the same: huggingface_hub reads HF_HUB_OFFLINE once, at its import, and without it an
# in-process lookup of a missing model retries the closed network for ~20 s
# (tests/test_planner.py::test_bad_input_is_one_line[argv6]: 23 s, 2 s with it).
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

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


def dsrecipes_cli(*argv: str):
    """`dsrecipes ARGV` through dsrecipes.cli.main (the console script is sys.exit(main())), in this process: the
    same exit code, stdout and stderr, without a fresh interpreter importing torch, transformers and DeepSpeed
    (6-20 s a call on 2 cores). An exception that would be a traceback there fails the test here.
    tests/test_check.py keeps one real `dsrecipes check` process for the console script itself."""
    import contextlib
    import io
    import types

    from dsrecipes import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# The preemption tests' run (tests/test_train_lm.py SIGUSR1, tests/test_faults.py Ctrl-C): 2 ranks, ZeRO-2, 40 steps,
# no checkpoint or eval but the one the signal asks for; both compare their resumed curve with one straight run.
PREEMPT_RUN = tiny_run(max_steps=40, save_steps=100, eval_steps=100)


@pytest.fixture(scope="session")
def straight_preempt_run(tmp_path_factory) -> str:
    """PREEMPT_RUN uninterrupted (output_dir), launched once for every test that resumes a preempted PREEMPT_RUN."""
    out = str(tmp_path_factory.mktemp("straight_preempt") / "run")
    args = PREEMPT_RUN + ["--output_dir", out]
    run(launch_cmd("recipes/train_lm.py", args, deepspeed="configs/deepspeed/zero2.json"), timeout=900)
    return out


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
