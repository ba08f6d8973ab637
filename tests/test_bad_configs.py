"""Every plausible bad config stops before launch with exactly one line per problem (key named, fix given), and
valid configs with unusual keys pass (no false positives). Checks come from DeepSpeed's pydantic models,
accelerate's ClusterConfig and the recipe fields' ranges (config/validate.py, config/limits.py).

Run: .venv/bin/python -m pytest tests/test_bad_configs.py -q            (the slow ones: -m slow)
"""

import json
import os
import subprocess

import pytest
import yaml

from conftest import ACCELERATE, BIN, DS_OK, DS_YAML, ROOT, TINY, child_env
from dsrecipes.config.args import EXPONENT_FLOAT, FLOAT_FIRST
from dsrecipes.config.check import lint_files
from dsrecipes.config.validate import ds_top_keys

UNKNOWN = "unknown DeepSpeed key; remove it or fix the spelling (see the DeepSpeed config docs)"
ONE_OF = "pick one of those"


def ds(**kw):
    return {**DS_OK, **kw}


def zero(**kw):
    return ds(zero_optimization={"stage": 3, **kw})


BAD_DEEPSPEED = [
    (
        zero(offload_param={"device": "gpu"}),
        "zero_optimization.offload_param.device: 'gpu': input should be 'none', 'cpu' or 'nvme'; use one of those",
    ),
    (
        ds(zero_optimization={"stage": 2, "offload_optimizer": {"device": "disk"}}),
        "zero_optimization.offload_optimizer.device: 'disk': input should be 'none', 'cpu' or 'nvme'; use one of those",
    ),
    (ds(gradient_accumulation_steps=0), 'gradient_accumulation_steps: 0 is below 1; write a value >= 1 or "auto"'),
    (
        ds(train_micro_batch_size_per_gpu=-2),
        'train_micro_batch_size_per_gpu: -2 is below 1; write a value >= 1 or "auto"',
    ),
    (
        ds(train_batch_size=2.5),
        'train_batch_size: expected a whole number, got 2.5; write a whole number >= 1 or "auto"',
    ),
    (ds(steps_per_print=0), 'steps_per_print: 0 is below 1; write a value >= 1 or "auto"'),
    (ds(gradient_clipping=-1.0), 'gradient_clipping: -1.0 is below 0; write a value >= 0 or "auto"'),
    (
        ds(bf16={"enabled": True}, fp16={"enabled": True}),
        'bf16.enabled: fp16 and bf16 are both enabled; DeepSpeed refuses that; enable one, or write "auto" in both '
        "so mixed_precision decides",
    ),
    (
        ds(scheduler={"type": "Cosine", "params": {}}),
        "scheduler.type: 'Cosine' is not a DeepSpeed scheduler; use one of ['LRRangeTest', 'OneCycle', 'WarmupLR', "
        "'WarmupDecayLR', 'WarmupCosineLR'] or drop the section (the recipe's lr_scheduler_type)",
    ),
    (
        ds(zero_optimization={"stage": 2, "reduce_bucket_size": -1}),
        "zero_optimization.reduce_bucket_size: -1: input should be greater than 0; use a larger value",
    ),
    (
        ds(zero_optimization={"stage": 2, "overlap_comm": "maybe"}),
        "zero_optimization.overlap_comm: 'maybe': input should be a valid boolean, unable to interpret input; "
        "write true or false",
    ),
    (
        ds(fp16={"enabled": "auto", "loss_scale": -1}),
        "fp16.loss_scale: -1: fp16.loss_scale must be >= 0 (0 enables dynamic loss scaling); "
        "see the DeepSpeed config docs",
    ),
    (
        ds(fp16={"enabled": "auto", "initial_scale_power": "high"}),
        "fp16.initial_scale_power: 'high': input should be a valid integer, unable to parse string as an integer; "
        "write a whole number",
    ),
    (
        ds(bf16={"enabled": "auto", "enable": True}),
        "bf16.enable: unknown DeepSpeed key; remove it or fix the spelling (did you mean enabled?)",
    ),
    (
        ds(comms_logger={"enabled": True, "verbos": True}),
        "comms_logger.verbos: unknown DeepSpeed key; remove it or fix the spelling (did you mean verbose?)",
    ),
    (
        ds(comms_logger={"enabled": "sure"}),
        "comms_logger.enabled: 'sure': input should be a valid boolean, unable to interpret input; write true or false",
    ),
    (ds(comms_loger={"enabled": True}), f"comms_loger: {UNKNOWN}"),
    (
        zero(offload_param={"device": "nvme"}),
        "zero_optimization.offload_param.nvme_path: missing for device nvme; set it to a directory on a local NVMe",
    ),
    (ds(zero_optimization=2), 'zero_optimization: expected an object, got 2; write "zero_optimization": {...}'),
    (ds(zero_optimization={"stage": 5}), "zero_optimization.stage: 5 is not a ZeRO stage; use 0, 1, 2 or 3"),
    (
        ds(zero_optimization={"stage": 3}, checkpoint={"load_universal": True}),
        "checkpoint.load_universal: set at save time under ZeRO-3, DeepSpeed writes only rank 0's model states, so "
        "every later checkpoint is broken (DeepSpeed #7546); leave it unset: --resume_from latest on another world "
        "size turns it on for that load only",
    ),
    (
        ds(checkpoint={"load_universal": True}),
        "checkpoint.load_universal: makes every start load a universal checkpoint (latest_universal): resuming the "
        "run's own checkpoints fails until each is converted, and ZeRO-0 has no universal format (DeepSpeed #7200); "
        "leave it unset: --resume_from latest on another world size converts the checkpoint and turns it on for "
        "that load only",
    ),
    (
        ds(tensorboard={"enabled": True, "output_pth": "tb"}),
        "tensorboard.output_pth: unknown DeepSpeed key; remove it or fix the spelling (did you mean output_path?)",
    ),
]

BAD_ACCELERATE = [
    (None, "-: empty accelerate config; write at least distributed_type and num_processes (see configs/accelerate/)"),
    ({"distributed_type": "MULTI_CPU", "num_processes": 0}, "num_processes: 0 is below 1; use 1 or more"),
    ({"num_machines": 0}, "num_machines: 0 is below 1; use 1 or more"),
    (
        {"distributed_type": "DEEP_SPEED", "num_processes": 2},
        "distributed_type: 'DEEP_SPEED' is not one of ['NO', 'MULTI_CPU', 'MULTI_GPU', 'MULTI_NPU', 'MULTI_MLU', "
        "'MULTI_SDAA', 'MULTI_MUSA', 'MULTI_XPU', 'DEEPSPEED', 'FSDP', 'XLA', 'MEGATRON_LM', 'MULTI_HPU', "
        f"'MULTI_NEURON']; {ONE_OF}",
    ),
    (
        {"mixed_precision": "bfloat16", "num_processes": 1},
        f"mixed_precision: 'bfloat16' is not one of ['no', 'fp8', 'fp16', 'bf16']; {ONE_OF}",
    ),
    ({"use_cpu": "sometimes"}, "use_cpu: expected bool, got 'sometimes'; write a bool value"),
    ({"num_machines": 2, "machine_rank": 2}, "machine_rank: 2 but num_machines is 2; use 0..1"),
    ({"main_process_port": 0}, "main_process_port: 0 is below 1; use 1 or more"),
    (
        {"compute_environment": "CLOUD"},
        f"compute_environment: 'CLOUD' is not one of ['LOCAL_MACHINE', 'AMAZON_SAGEMAKER']; {ONE_OF}",
    ),
    ({"deepspeed_config": "zero2.json"}, "deepspeed_config: expected dict, got 'zero2.json'; write a dict value"),
]

BAD_RECIPE = [
    ({"learning_rate": -0.1}, "learning_rate: -0.1 is out of range (must be > 0); write a value > 0"),
    ({"learning_rate": 0}, "learning_rate: 0 is out of range (must be > 0); write a value > 0"),
    (
        {"gradient_accumulation_steps": 0},
        "gradient_accumulation_steps: 0 is out of range (must be >= 1); write a value >= 1",
    ),
    ({"max_steps": 0}, "max_steps: 0 is out of range (must be >= 1); write a value >= 1"),
    (
        {"per_device_train_batch_size": -1},
        "per_device_train_batch_size: -1 is out of range (must be >= 1); write a value >= 1",
    ),
    ({"warmup_steps": -5}, "warmup_steps: -5 is out of range (must be >= 0); write a value >= 0"),
    ({"adam_beta2": 1.5}, "adam_beta2: 1.5 is out of range (must be <= 1); write a value <= 1"),
    (
        {"lr_scheduler_type": "cosine_annealing"},
        "lr_scheduler_type: 'cosine_annealing' is not one of ['linear', 'cosine', 'cosine_with_restarts', "
        "'polynomial', 'constant', 'constant_with_warmup', 'inverse_sqrt', 'reduce_lr_on_plateau', "
        "'cosine_with_min_lr', 'cosine_warmup_with_min_lr', 'warmup_stable_decay', 'greedy']; pick one of those",
    ),
    # written quoted (QuotingDumper): an unquoted 3e-4 is a float (YAML 1.2 floats, tests/test_check.py)
    (
        {"learning_rate": "3e-4"},
        "learning_rate: expected a number, got str '3e-4'; write it unquoted: learning_rate: 3e-4",
    ),
    ({"port": 70000, "dtype": "fp32"}, "port: 70000 is out of range (must be <= 65535); write a value <= 65535"),
    ({"temperature": 0.0, "alpha_kd": 0.5}, "temperature: 0.0 is out of range (must be > 0); write a value > 0"),
]


class QuotingDumper(yaml.SafeDumper):
    """safe_dump that quotes a string the recipe loader would read as a float ("3e-4"), as a user quoting it does."""


QuotingDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, FLOAT_FIRST)


def write(tmp_path, name, data):
    path = tmp_path / name
    if data is None:
        path.write_text("")
    else:
        path.write_text(json.dumps(data) if name.endswith(".json") else yaml.dump(data, Dumper=QuotingDumper))
    return str(path)


def lines(errs):
    return [e.line() for e in errs]


def test_at_least_thirty_distinct_bad_configs():
    expected = [e for _, e in BAD_DEEPSPEED + BAD_ACCELERATE + BAD_RECIPE]
    assert len(set(expected)) == len(expected) >= 30


@pytest.mark.parametrize("data,expected", BAD_DEEPSPEED, ids=[e.split(":")[0] for _, e in BAD_DEEPSPEED])
def test_bad_deepspeed_json_is_one_line(tmp_path, data, expected):
    path = write(tmp_path, "ds.json", data)
    assert lines(lint_files(deepspeed=path)) == [f"error: {path}: {expected}"]


@pytest.mark.parametrize("data,expected", BAD_ACCELERATE, ids=[e.split(":")[0] for _, e in BAD_ACCELERATE])
def test_bad_accelerate_yaml_is_one_line(tmp_path, data, expected):
    path = write(tmp_path, "acc.yaml", data)
    assert lines(lint_files(accelerate=path)) == [f"error: {path}: {expected}"]


@pytest.mark.parametrize("data,expected", BAD_RECIPE, ids=[e.split(":")[0] for _, e in BAD_RECIPE])
def test_bad_recipe_value_is_one_line(tmp_path, data, expected):
    path = write(tmp_path, "r.yaml", data)
    assert lines(lint_files(recipe=path)) == [f"error: {path}: {expected}"]


def test_bad_recipe_flag_is_checked_like_the_yaml(tmp_path):
    path = write(tmp_path, "r.yaml", {"max_steps": 5})
    out = lines(lint_files(recipe=path, recipe_flags=["--max_steps", "0"]))
    assert out == ["error: <cli>: max_steps: 0 is out of range (must be >= 1); write a value >= 1"]
    out = lines(lint_files(recipe=path, recipe_flags=["--gradient_accumulation_steps=-1"]))
    assert out == ["error: <cli>: gradient_accumulation_steps: -1 is out of range (must be >= 1); write a value >= 1"]


def test_unusual_but_valid_configs_pass(tmp_path):
    good_ds = ds(
        comms_logger={"enabled": True, "verbose": False, "prof_all": True, "debug": False},
        flops_profiler={"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1},
        scheduler={
            "type": "WarmupLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
        },
        zero_optimization={
            "stage": 3,
            "stage3_gather_16bit_weights_on_model_save": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
        },
        fp16={"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2},
        data_types={"grad_accum_dtype": "fp32"},
        tensorboard={"enabled": False, "output_path": "tb/", "job_name": "x"},
        wall_clock_breakdown=False,
        dataloader_drop_last=True,
        _comment="kept for humans",
    )
    good_acc = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_CPU",
        "num_processes": 2,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": "no",
        "use_cpu": True,
        "debug": False,
        "downcast_bf16": "no",  # what `accelerate config` writes
        "dynamo_config": {"dynamo_backend": "INDUCTOR"},
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "enable_cpu_affinity": False,
        "tpu_env": [],
    }
    good_rec = {"learning_rate": 3.0e-4, "lr_scheduler_type": "warmup_stable_decay", "warmup_steps": 0}
    out = lint_files(
        accelerate=write(tmp_path, "a.yaml", good_acc),
        deepspeed=write(tmp_path, "d.json", good_ds),
        recipe=write(tmp_path, "r.yaml", good_rec),
        recipe_flags=["--learning_rate", "3e-4", "--max_steps", "3"],
    )
    assert lines(out) == []


def test_top_level_keys_come_from_deepspeed_itself():
    keys = ds_top_keys()
    # read by DeepSpeedConfig in 0.19.8 but missing from the old hand-kept list
    assert {"comms_logger", "tensor_parallel", "log_level"} <= keys
    assert {"zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "flops_profiler", "aio"} <= keys
    # keys of nested sections, not top-level ones
    assert not {"stage", "offload_param", "enabled", "mics_shard_size"} & keys


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_make_train_with_a_bad_recipe_value_prints_one_error_and_no_traceback(tmp_path):
    recipe = write(tmp_path, "bad.yaml", {**yaml.safe_load(open(os.path.join(ROOT, TINY))), "max_steps": 0})
    proc = _run(["make", "-o", ".venv/.setup-stamp", f"BIN={BIN}", "train", f"RECIPE={recipe}", "ARGS="])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert [ln for ln in out.splitlines() if "error:" in ln] == [
        f"error: {recipe}: max_steps: 0 is out of range (must be >= 1); write a value >= 1"
    ], out
    assert "Traceback" not in out and "accelerate launch" not in out, out


@pytest.mark.slow
def test_two_process_launch_prints_a_bad_value_once():
    """A launch that skips `dsrecipes check` (a bad CLI value): rank 0 prints the line, rank 1 exits quietly."""
    cmd = [ACCELERATE, "launch", "--config_file", DS_YAML, "--num_cpu_threads_per_process", "1"]
    proc = _run([*cmd, "recipes/train_lm.py", "--config", TINY, "--gradient_accumulation_steps", "0"])
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0
    assert errors == [
        "error: <cli>: gradient_accumulation_steps: 0 is out of range (must be >= 1); write a value >= 1"
    ], proc.stderr
