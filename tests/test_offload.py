"""ZeRO-3 offload as shipped: parameters and optimizer to CPU (zero3_offload.json) and to NVMe (zero3_nvme.json, a
temporary directory as the NVMe path; DeepSpeed's async_io op needs libaio, `make setup-system`), the NVMe refusals,
and the plain-DDP accelerate YAML (cpu_2proc.yaml). Real 2-process `accelerate launch` runs.

Run: .venv/bin/python -m pytest tests/test_offload.py -q    (first run JIT-builds cpu_adam and async_io: minutes)
"""

import json
import os

import pytest
import torch

from conftest import ROOT, summary, train_curve
from dsrecipes.config import check
from test_memory_recipes import STEPS, train


# ---------------------------------------------------------------------------- ZeRO-3 offload to CPU and to NVMe
def engine_config(out: str) -> dict:
    """The DeepSpeed config the engine ran with ("auto" filled in), as its final ZeRO checkpoint records it."""
    ckpt = os.path.join(out, "checkpoints", "step_%08d" % STEPS, "pytorch_model")
    states = torch.load(os.path.join(ckpt, "zero_pp_rank_0_mp_rank_00_model_states.pt"), weights_only=False)
    return states["ds_config"]


@pytest.fixture(scope="module")
def zero3_offload_run(tmp_path_factory):
    """configs/deepspeed/zero3_offload.json as shipped, 2 processes (the first run JIT-builds cpu_adam, ~3.5 min)."""
    return train(tmp_path_factory.mktemp("zero3_offload"), "run", TINY_RECIPE, deepspeed=ZERO3_OFFLOAD)


TINY_RECIPE = "configs/recipes/train_tiny_zero2.yaml"
ZERO3_OFFLOAD = "configs/deepspeed/zero3_offload.json"


@pytest.mark.slow
def test_recipe_zero3_offload_of_params_and_optimizer_2proc(zero3_offload_run):
    s, curve = summary(zero3_offload_run), train_curve(zero3_offload_run)
    assert s["status"] == "completed" and s["zero_stage"] == 3 and s["world_size"] == 2 and len(curve) == STEPS
    assert curve[-1][1] < curve[0][1], curve
    zero = engine_config(zero3_offload_run)["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert isinstance(zero["reduce_bucket_size"], int)  # "auto" was filled before the engine saw it
    # ZeRO-3: each rank holds half of the fp32 parameters
    assert s["memory"]["at_step"]["parameters"] == pytest.approx(4 * s["params"] / 2, rel=0.05)


@pytest.mark.slow
def test_recipe_zero3_nvme_offload_to_a_temporary_directory_2proc(tmp_path, zero3_offload_run):
    """configs/deepspeed/zero3_nvme.json with a temporary directory as the NVMe path (the first run JIT-builds
    DeepSpeed's async_io op, minutes): the optimizer states are swapped to files there, and the curve is the CPU
    offload run's exactly (the same DeepSpeedCPUAdam; the swap is a lossless round trip)."""
    from dsrecipes.config.nvme import aio_op_builds, check_nvme

    if not aio_op_builds():
        pytest.skip("DeepSpeed's async_io op needs libaio here: apt-get install libaio-dev")
    nvme_dir = tmp_path / "nvme"
    nvme_dir.mkdir()
    with open(os.path.join(ROOT, "configs/deepspeed/zero3_nvme.json")) as fh:
        cfg = json.load(fh)
    for section in ("offload_optimizer", "offload_param"):
        cfg["zero_optimization"][section]["nvme_path"] = str(nvme_dir)
    ds = tmp_path / "zero3_nvme.json"
    ds.write_text(json.dumps(cfg))
    assert check_nvme(cfg, on_cpu=True, where=str(ds)) == []
    out = train(tmp_path, "run", TINY_RECIPE, deepspeed=str(ds))
    s, curve = summary(out), train_curve(out)
    assert s["status"] == "completed" and s["zero_stage"] == 3 and s["world_size"] == 2
    assert curve == train_curve(zero3_offload_run)
    zero = engine_config(out)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "nvme"
    for rank in (0, 1):
        swapped = os.listdir(nvme_dir / "zero_stage_3" / "optimizer" / f"rank{rank}")
        assert {"exp_avg", "exp_avg_sq"} <= {f.split("-")[0] for f in swapped}, swapped  # Adam's two moments
        assert all(f.endswith(".tensor.swp") for f in swapped), swapped
    # the parameter swapper keeps the fp32 run's dtype (compat.keep_zero3_init_dtype: bfloat16params without it here)
    assert sorted(os.listdir(nvme_dir / "zero_stage_3")) == ["float32params", "optimizer"]


def test_nvme_offload_problems_are_one_line_errors(tmp_path):
    from dsrecipes.config.nvme import check_nvme

    with open(os.path.join(ROOT, "configs/deepspeed/zero3_nvme.json")) as fh:
        shipped = json.load(fh)
    where = "configs/deepspeed/zero3_nvme.json"
    # linting before the target machine exists: the config itself is fine
    assert check_nvme(shipped, on_cpu=True, where=where, machine=False) == []
    with open(os.path.join(ROOT, ZERO3_OFFLOAD)) as fh:
        assert check_nvme(json.load(fh), on_cpu=True, where=where) == []  # no NVMe: nothing to check

    def with_path(path, stage=3):
        cfg = json.loads(json.dumps(shipped))
        cfg["zero_optimization"]["stage"] = stage
        for section in ("offload_optimizer", "offload_param"):
            cfg["zero_optimization"][section]["nvme_path"] = str(path)
        return cfg

    ok = tmp_path / "nvme"
    ok.mkdir()
    assert check_nvme(with_path(ok), on_cpu=True, where=where, aio_builds=lambda: True) == []
    missing = [e.line() for e in check_nvme(with_path(tmp_path / "absent"), True, where, aio_builds=lambda: True)]
    assert len(missing) == 2 and all(f"{tmp_path / 'absent'} is not a directory" in m for m in missing), missing
    assert missing[0].startswith(f"error: {where}: zero_optimization.offload_param.nvme_path: ")
    no_aio = [e.line() for e in check_nvme(with_path(ok), True, where, aio_builds=lambda: False)]
    assert no_aio == [
        f"error: {where}: zero_optimization.offload_param.device: nvme offload needs DeepSpeed's async_io op, which "
        "cannot build on this CPU machine (libaio not found); install libaio-dev (apt-get install libaio-dev) or use "
        "device: cpu (zero3_offload.json)"
    ]
    no_path = json.loads(json.dumps(shipped))
    del no_path["zero_optimization"]["offload_param"]["nvme_path"]
    assert [e.line() for e in check_nvme(no_path, True, where, machine=False)] == [
        f"error: {where}: zero_optimization.offload_param.nvme_path: missing for device nvme; set it to a directory "
        "on a local NVMe"
    ]
    # parameter offload below ZeRO-3 is the rule table's, once: not repeated here
    assert check_nvme(with_path(ok, stage=2), True, where, aio_builds=lambda: True) == []
    bad = tmp_path / "stage2.json"
    bad.write_text(json.dumps(with_path(ok, stage=2)))
    lines = [e.line() for e in check.lint_files(deepspeed=str(bad))]
    assert lines == [
        f"error: {bad}: zero_optimization.offload_param: parameter offload needs ZeRO stage 3; set "
        "zero_optimization.stage to 3 or remove offload_param"
    ], lines


@pytest.mark.slow
def test_accelerate_launch_of_cpu_2proc_yaml_is_refused_not_run_alone(tmp_path):
    """accelerate 1.15 starts a MULTI_CPU config without --mpirun_hostfile as ONE process (its simple launcher): the
    recipe says so in one line instead of training alone with world size 1. Plain DDP on 2 CPU processes runs through
    torchrun (tests/test_memory_recipes.py::test_recipe_full_reentrant_bf16_8bit_plain_ddp_2proc)."""
    from conftest import launch_cmd, run

    args = ["--config", TINY_RECIPE, "--max_steps", "2", "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    proc = run(
        launch_cmd("recipes/train_lm.py", args, accelerate_config="configs/accelerate/cpu_2proc.yaml"),
        check=False,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # the recipe exits 2 with its line; accelerate's simple launcher then prints its own CalledProcessError
    # traceback (accelerate/commands/launch.py), with no frame of ours in it
    assert proc.returncode != 0 and "exit status 2" in proc.stderr, proc.stderr[-3000:]
    assert 'recipes/train_lm.py", line' not in proc.stderr and "dsrecipes/" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [
        "error: <accelerate launch>: distributed_type: MULTI_CPU with num_processes > 1 started ONE process "
        "(accelerate launch needs --mpirun_hostfile for it); run plain DDP on CPU as `ACCELERATE_USE_CPU=true torchrun "
        "--nproc_per_node N recipes/...`, or use configs/accelerate/deepspeed_cpu_2proc.yaml"
    ], errors
    assert not os.path.exists(tmp_path / "o" / "summary.json")
