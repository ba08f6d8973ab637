"""Layer freezing through recipes/train_lm.py under DeepSpeed: progressive freezing with the prefix cache (ZeRO-2
equals ZeRO-0), cubic and adaptive schedules, static freezing under ZeRO-3, and the shipped adaptive config.

Run: .venv/bin/python -m pytest tests/test_freezing_recipes.py -q      (real 1- and 2-process launches, minutes)
"""

import os

import pytest
import torch

from conftest import launch_cmd, read_jsonl, run, summary, train_curve

NODROP = "configs/models/tiny_gpt2_nodropout.json"


# ---------------------------------------------------------------------------- recipe runs under DeepSpeed
STEPS = 12
BASE = [
    "--config",
    "configs/recipes/freeze_tiny_progressive.yaml",
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--eval_steps",
    "100",
    "--save_steps",
    "6",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "12",
    "--eval_docs",
    "20",
    "--warmup_steps",
    "2",
    "--freeze_start",
    "0.2",
    "--freeze_end",
    "0.5",
]


def check_events(s, shards):
    fz = s["freezing"]
    ev = fz["events"]
    assert [e["step"] for e in ev] == fz["planned_steps"] == [2, 4, 6]
    before = [e["optimizer_params_before"] for e in ev]
    after = [e["optimizer_params_after"] for e in ev]
    assert all(a < b for a, b in zip(after, before)) and after[:-1] == before[1:]
    assert fz["frozen_weights_unchanged"] is True
    trainable = s["params"] - s["frozen_params"]
    # the optimizer holds exactly the trainable parameters (ZeRO 1/2: this rank's 1/world share of them)
    assert abs(after[-1] * shards - trainable) <= 64 * shards, (after[-1], trainable)
    return fz


@pytest.mark.slow
def test_progressive_freezing_zero2_with_cache_equals_zero0_two_processes(tmp_path):
    outs = {}
    for stage, extra in (("zero2", ["--freeze_cache", "memory"]), ("zero0", ["--freeze_cache", "none"])):
        outs[stage] = str(tmp_path / stage)
        run(
            launch_cmd(
                "recipes/train_lm.py",
                BASE + ["--output_dir", outs[stage], *extra],
                deepspeed=f"configs/deepspeed/{stage}.json",
            ),
            timeout=600,
        )
    z2, z0 = summary(outs["zero2"]), summary(outs["zero0"])
    fz = check_events(z2, shards=2)
    check_events(z0, shards=1)  # ZeRO-0: every rank holds the whole (trainable) optimizer
    assert fz["cache"]["hits"] > 0 and fz["cache"]["off_reason"] is None
    # ZeRO-2's rebuilt flat partitions (Adam state carried over fragment by fragment) and ZeRO-0's torch optimizer
    # (state handed over per parameter) give the same curve; the cache changes nothing either.
    c2, c0 = train_curve(outs["zero2"]), train_curve(outs["zero0"])
    assert [d for *_, d in c2] == [d for *_, d in c0]
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(c2, c0)), (c2, c0)
    assert os.path.isfile(os.path.join(outs["zero2"], "final", "model.safetensors"))
    # Resume from the step-6 checkpoint (3 units frozen there): the freezer re-freezes them before building the
    # optimizer, so the checkpoint's partitions fit and the rest of the curve is the same.
    resumed = str(tmp_path / "resumed")
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                resumed,
                "--freeze_cache",
                "memory",
                "--resume_from",
                os.path.join(outs["zero2"], "checkpoints", "step_00000006"),
            ],
            deepspeed="configs/deepspeed/zero2.json",
        )
    )
    assert train_curve(resumed)[-6:] == c2[-6:]


@pytest.mark.slow
def test_cubic_and_adaptive_one_process(tmp_path):
    cubic = str(tmp_path / "cubic")
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                cubic,
                "--freeze_schedule",
                "cubic",
                "--freeze_end",
                "0.9",
                "--freeze_cache",
                "disk",
                "--freeze_cache_dir",
                str(tmp_path / "cache"),
            ],
            deepspeed="configs/deepspeed/zero1.json",
            num_processes=1,
        )
    )
    fz = summary(cubic)["freezing"]
    assert fz["planned_steps"] == [2, 6, 11] and fz["frozen_weights_unchanged"] and fz["cache"]["hits"] > 0
    assert any(f.endswith(".pt") for f in os.listdir(tmp_path / "cache"))
    adaptive = str(tmp_path / "adaptive")  # no DeepSpeed: the plain torch optimizer is rebuilt
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                adaptive,
                "--freeze_schedule",
                "adaptive",
                "--freeze_check_steps",
                "1",
                "--freeze_threshold",
                "10",
                "--freeze_window",
                "1",
                "--freeze_start",
                "0.3",
                "--freeze_embeddings",
                "true",
                "--freeze_first_n_blocks",
                "1",
            ],
            accelerate_config="configs/accelerate/cpu_1proc.yaml",
        )
    )
    s = summary(adaptive)
    ev = s["freezing"]["events"]
    # static part: embeddings + block 0 frozen from the start, the tied head untied (its own 257 x 128 matrix)
    assert s["freezing"]["initial_frozen_params"] == 257 * 128 + 256 * 128 + 198272 and s["params"] == 891904
    # threshold 10 (any change counts as settled): after two measured intervals the other units qualify at once
    assert ev and ev[0]["step"] == 4 and ev[0]["frozen_units"] == 3 and s["freezing"]["frozen_weights_unchanged"]
    assert s["freezing"]["grad_norm_history"][0]["step"] == 1
    assert len(read_jsonl(os.path.join(adaptive, "metrics.jsonl"))) >= STEPS


@pytest.mark.slow
def test_static_freezing_zero3_two_processes_keeps_no_state_for_frozen_weights(tmp_path):
    """configs/recipes/freeze_tiny_static.yaml as shipped, under ZeRO-3 with 2 processes: the frozen embeddings and
    blocks 0-1 get no optimizer state (each rank holds fp32 master + Adam, 12 B, for its half of the trainable
    parameters only) and leave the run exactly as they came in, while the trained blocks move."""
    from safetensors.torch import load_file

    common = [
        "--config",
        "configs/recipes/freeze_tiny_static.yaml",
        "--logging_steps",
        "1",
        "--eval_steps",
        "100",
        "--save_steps",
        "0",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "4",
        "--generated_docs",
        "40",
        "--eval_docs",
        "20",
        "--warmup_steps",
        "1",
    ]
    outs = {}
    for steps in (1, 4):
        outs[steps] = str(tmp_path / f"steps{steps}")
        run(
            launch_cmd(
                "recipes/train_lm.py",
                common + ["--max_steps", str(steps), "--output_dir", outs[steps]],
                deepspeed="configs/deepspeed/zero3.json",
            )
        )
    s = summary(outs[4])
    assert s["zero_stage"] == 3 and s["world_size"] == 2 and s["status"] == "completed"
    trainable = s["params"] - s["frozen_params"]
    assert s["frozen_params"] == s["freezing"]["initial_frozen_params"] and 0 < trainable < s["params"]
    at = s["memory"]["at_step"]
    assert at["optimizer_states"] == pytest.approx(12 * trainable / 2, rel=0.02), (at, trainable)
    w1, w4 = (load_file(os.path.join(outs[k], "final", "model.safetensors")) for k in (1, 4))
    frozen = [
        k for k in w4 if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1."))
    ]
    trained = [k for k in w4 if k.startswith(("transformer.h.2.", "transformer.h.3."))]
    assert frozen and trained
    assert all(torch.equal(w1[k], w4[k]) for k in frozen)
    assert all(not torch.equal(w1[k], w4[k]) for k in trained if k.endswith(".weight"))


@pytest.mark.slow
def test_freeze_tiny_adaptive_yaml_freezes_blocks_two_processes(tmp_path):
    """configs/recipes/freeze_tiny_adaptive.yaml through --config (its adaptive schedule, 10-step intervals, window 2,
    threshold 0.35, the prefix cache on disk), 2 processes under ZeRO-2, 100 of its 300 steps."""
    out = str(tmp_path / "adaptive")
    flags = ["--max_steps", "100", "--eval_steps", "100", "--save_steps", "0", "--report_to", "none"]
    flags += ["--export_final", "false", "--output_dir", out]
    run(launch_cmd("recipes/train_lm.py", ["--config", "configs/recipes/freeze_tiny_adaptive.yaml", *flags]))
    s = summary(out)
    fz = s["freezing"]
    assert s["status"] == "completed" and s["world_size"] == 2 and s["zero_stage"] == 2
    assert fz["schedule"] == "adaptive" and fz["initial_frozen_params"] == 0
    assert fz["final_frozen_params"] > 0 and s["frozen_params"] == fz["final_frozen_params"] < s["params"]
    assert fz["events"] and all(20 <= e["step"] < 100 for e in fz["events"])  # never before 20% of the run
    assert fz["events"][-1]["optimizer_params_after"] < fz["events"][0]["optimizer_params_before"]
    assert fz["frozen_weights_unchanged"] is True
    history = fz["grad_norm_history"]
    assert [h["step"] for h in history] == list(range(10, 101, 10))  # freeze_check_steps: 10
    assert fz["cache"]["off_reason"] is None and fz["cache"]["entries"] > 0  # the frozen prefix cached on disk
