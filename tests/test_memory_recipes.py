"""Memory techniques through recipes/train_lm.py for real (`accelerate launch`, torchrun): every_k and DeepSpeed
checkpointing, HF reentrant checkpointing with bf16 and 8-bit under plain DDP, bf16 + DeepSpeed checkpointing +
8-bit under ZeRO-3, torchao 4-bit, the cpu_checkpointing refusal, and fp16 with loss scaling on a GPU.

Run: .venv/bin/python -m pytest tests/test_memory_recipes.py -q      (minutes)
"""

import json
import os

import pytest
import torch

from conftest import BIN, ROOT, free_port, launch_cmd, run, summary, train_curve
from test_memory import KNOBS

STEPS = 4
COMMON = [
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--eval_steps",
    str(STEPS),
    "--save_steps",
    "0",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "300",
    "--eval_docs",
    "40",
    "--max_eval_batches",
    "2",
    "--warmup_steps",
    "2",
    "--export_final",
    "false",
]


# ---------------------------------------------------------------------------- the recipe, for real
def train(tmp_path, name, recipe, *extra, accelerate=None, deepspeed=None, nproc=2, mixed_precision=None, check=True):
    out = str(tmp_path / name)
    cmd = launch_cmd(
        "recipes/train_lm.py",
        ["--config", recipe, *COMMON, "--output_dir", out, *extra],
        **({"accelerate_config": accelerate} if accelerate else {}),
        deepspeed=deepspeed,
        num_processes=nproc,
    )
    if mixed_precision:
        cmd.insert(cmd.index("recipes/train_lm.py"), f"--mixed_precision={mixed_precision}")
    proc = run(cmd, timeout=600, check=check)
    return out if check else proc


@pytest.mark.slow
def test_recipe_every_k_and_deepspeed_checkpointing_2proc(tmp_path):
    """every_k under ZeRO-2 and DeepSpeed's checkpoint under ZeRO-3 (zero3_actckpt.json) train the same curve."""
    ek = train(tmp_path, "every_k", "configs/recipes/train_tiny_ckpt_every_k.yaml")
    ds = train(
        tmp_path,
        "ds",
        "configs/recipes/train_tiny_ckpt_deepspeed.yaml",
        deepspeed="configs/deepspeed/zero3_actckpt.json",
    )
    a, b = train_curve(ek), train_curve(ds)
    assert len(a) == STEPS and [d for *_, d in a] == [d for *_, d in b]
    assert all(abs(x[1] - y[1]) < 1e-4 for x, y in zip(a, b)), (a, b)
    s_ek, s_ds = summary(ek), summary(ds)
    assert s_ek["activation_checkpointing"] == {"mode": "every_k", "reentrant": False, "every_k": 2, "segments": 2}
    assert s_ds["activation_checkpointing"]["deepspeed"] == {
        k: False if k != "number_checkpoints" else None for k in KNOBS
    }
    assert s_ds["zero_stage"] == 3 and s_ds["world_size"] == 2
    # 2 kept block inputs vs 4: every_k saves less for backward than per-block checkpointing
    assert 0 < s_ek["memory"]["activation_bytes_per_micro_batch"] < s_ds["memory"]["activation_bytes_per_micro_batch"]


@pytest.mark.slow
def test_recipe_full_reentrant_bf16_8bit_plain_ddp_2proc(tmp_path):
    """Plain DDP over gloo, 2 processes: torchrun with ACCELERATE_USE_CPU (accelerate's own multi-CPU path; its
    `launch` needs mpirun for MULTI_CPU) and ACCELERATE_MIXED_PRECISION=bf16 (what --mixed_precision sets)."""
    out = str(tmp_path / "ddp")
    run(
        [
            os.path.join(BIN, "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "recipes/train_lm.py",
            "--config",
            "configs/recipes/train_tiny_ckpt_full.yaml",
            *COMMON,
            "--output_dir",
            out,
            "--gradient_checkpointing_reentrant",
            "true",
            "--optimizer",
            "adamw_8bit",
        ],
        ACCELERATE_USE_CPU="true",
        ACCELERATE_MIXED_PRECISION="bf16",
    )
    s, curve = summary(out), train_curve(out)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["zero_stage"] is None
    assert s["mixed_precision"] == "bf16" and s["activation_checkpointing"]["reentrant"] is True
    assert curve[-1][1] < curve[0][1]
    # DDP: the whole 8-bit state on each rank, ~2 bytes per parameter instead of AdamW's 8
    assert s["memory"]["optimizer_state_bytes"] <= 0.26 * 8 * s["params"]


@pytest.mark.slow
def test_recipe_bf16_deepspeed_and_8bit_under_zero3_2proc(tmp_path):
    bf = train(
        tmp_path, "bf16", "configs/recipes/train_tiny_bf16.yaml", "--optimizer", "adamw_8bit", mixed_precision="bf16"
    )
    z3 = train(tmp_path, "z3", "configs/recipes/train_tiny_adamw8bit.yaml", deepspeed="configs/deepspeed/zero3.json")
    for out, stage in ((bf, 2), (z3, 3)):
        s, curve = summary(out), train_curve(out)
        assert s["status"] == "completed" and s["zero_stage"] == stage and curve[-1][1] < curve[0][1]
        at = s["memory"]["at_step"]
        # per rank: fp32 master partition (4 B/param / 2 ranks) + 8-bit states (~2 B/param / 2 ranks)
        assert at["optimizer_states"] <= 0.5 * (4 + 2.1) * s["params"], at
    assert (
        summary(bf)["mixed_precision"] == "bf16"
        and summary(bf)["memory"]["at_step"]["parameters"] < summary(z3)["memory"]["at_step"]["parameters"] * 2
    )  # bf16 weights: 2 bytes, not 4


@pytest.mark.slow
def test_recipe_torchao_4bit_one_process(tmp_path):
    out = train(
        tmp_path,
        "ao",
        "configs/recipes/train_tiny_adamw8bit.yaml",
        "--optimizer",
        "torchao_adamw_4bit",
        accelerate="configs/accelerate/cpu_1proc.yaml",
        nproc=1,
    )
    s, curve = summary(out), train_curve(out)
    assert s["world_size"] == 1 and s["optimizer"] == "torchao_adamw_4bit" and curve[-1][1] < curve[0][1]
    assert s["memory"]["optimizer_state_bytes"] < 0.5 * 8 * s["params"]


@pytest.mark.slow
def test_recipe_refuses_cpu_checkpointing_on_cpu(tmp_path):
    with open(os.path.join(ROOT, "configs/deepspeed/zero2_actckpt.json")) as fh:
        cfg = json.load(fh)
    cfg["activation_checkpointing"]["cpu_checkpointing"] = True
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    proc = train(
        tmp_path, "refused", "configs/recipes/train_tiny_ckpt_deepspeed.yaml", deepspeed=str(ds), nproc=1, check=False
    )
    # the recipe exits 2 with one line; accelerate's launcher then reports the failed child with its own traceback
    assert proc.returncode != 0 and 'recipes/train_lm.py", line' not in proc.stderr, proc.stderr[-3000:]
    assert "(exitcode: 2)" in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "activation_checkpointing.cpu_checkpointing: breaks on the CPU accelerator" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with loss scaling needs a GPU")
def test_fp16_with_loss_scaling_on_gpu(tmp_path):
    out = train(
        tmp_path,
        "fp16",
        "configs/recipes/train_tiny_fp16.yaml",
        deepspeed="configs/deepspeed/zero2.json",
        nproc=1,
        mixed_precision="fp16",
    )
    s, curve = summary(out), train_curve(out)
    assert s["mixed_precision"] == "fp16" and s["status"] == "completed" and curve[-1][1] < curve[0][1]
    assert "max_memory_allocated_mb" in s["memory"]
