"""The shared training loop (dsrecipes.train.loop) through recipes/distill.py: exact resume after SIGUSR1 and after a
SIGKILL in the middle of a checkpoint write, across both phases (distill, then scratch); the student trained with
ZeRO-3 + bitsandbytes 8-bit + static freezing + activation checkpointing; MFU and the step-time breakdown.

Run: .venv/bin/python -m pytest tests/test_loop.py -q      (about 5 minutes on 2 busy cores: 6 two-process launches)
"""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, child_env, launch_cmd, read_jsonl, run, summary

DISTILL = "configs/recipes/distill_tiny_4to2.yaml"
STEPS = 6  # per phase: distill steps 1-6 are checkpoints 2, 4, 6; scratch steps 1-6 are checkpoints 8, 10, 12
BASE = [
    "--config",
    DISTILL,
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--eval_steps",
    "3",
    "--save_steps",
    "2",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "100",
    "--eval_docs",
    "20",
    "--warmup_steps",
    "2",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A from-config tiny GPT-2 (4 blocks, not trained: the loop is under test, not the teacher) + byte tokenizer."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    path = str(tmp_path_factory.mktemp("teacher"))
    torch.manual_seed(0)
    tok = byte_tokenizer()
    AutoModelForCausalLM.from_config(load_model_config("configs/models/tiny_gpt2.json", tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run(launch_cmd("recipes/distill.py", BASE + ["--teacher_name_or_path", teacher, "--output_dir", out]), timeout=900)
    return out


def curve(out: str) -> list[dict]:
    """Every metrics.jsonl line (losses, each term, lr, data fingerprint, evals, phase) except the timing."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.slow
def test_distill_resumes_exactly_after_sigusr1_then_a_kill_inside_a_checkpoint_write(teacher, straight, tmp_path):
    import psutil

    out = str(tmp_path / "resumed")
    args = BASE + ["--teacher_name_or_path", teacher, "--output_dir", out]
    ckpts = os.path.join(out, "checkpoints")
    # 1. SIGUSR1 to the training ranks (as SLURM's --signal does) once the first step is logged: checkpoint, exit 0.
    cmd = launch_cmd("recipes/distill.py", args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
    while time.time() < deadline and not os.path.exists(metrics):
        time.sleep(0.05)
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "recipes/distill.py" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    for p in workers:
        p.send_signal(signal.SIGUSR1)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    s = summary(out)
    assert s["status"] == "preempted" and "preempted in the distill phase" in text, text[-2000:]
    assert "resume with --resume_from latest" in text and not os.path.exists(os.path.join(out, "final"))
    preempted_at = open(os.path.join(ckpts, "latest")).read().strip()
    assert preempted_at < f"step_{STEPS:08d}"  # inside the distill phase
    # 2. Resume; SIGKILL inside the last checkpoint write (scratch step 6): after save_state, before the rename.
    proc = run(
        launch_cmd("recipes/distill.py", args + ["--resume_from", "latest"]),
        check=False,
        timeout=900,
        DSRECIPES_FAULT_KILL_IN_SAVE=2 * STEPS,
    )
    assert proc.returncode != 0
    assert open(os.path.join(ckpts, "latest")).read().strip() == f"step_{2 * STEPS - 2:08d}"  # scratch step 4
    assert os.path.isdir(os.path.join(ckpts, f".tmp-step_{2 * STEPS:08d}"))  # the half-written one, never renamed
    assert summary(out)["status"] == "preempted"  # the killed run wrote no summary
    # 3. Resume from inside the scratch phase and finish: the same run as the uninterrupted one, bit for bit.
    run(launch_cmd("recipes/distill.py", args + ["--resume_from", "latest"]), timeout=900)
    assert curve(out) == curve(straight)
    phases = [r["phase"] for r in curve(out)]
    assert phases.count("distill") == phases.count("scratch") == STEPS + 2  # 6 steps + evals at 3 and 6 each
    a, b = summary(out), summary(straight)
    assert a["status"] == b["status"] == "completed" and a["resumed_from"].endswith(f"step_{2 * STEPS - 2:08d}")
    for who in ("student", "scratch"):
        assert a[who]["eval_loss"] == b[who]["eval_loss"] and a[who]["final_loss"] == b[who]["final_loss"]
    assert a["teacher"] == b["teacher"] and a["quality_vs_teacher"] == b["quality_vs_teacher"]
    for name in ("final", "scratch_final"):
        wa, wb = weights(os.path.join(out, name)), weights(os.path.join(straight, name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert not os.path.exists(os.path.join(ckpts, f".tmp-step_{2 * STEPS:08d}"))
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == [
        f"step_{2 * STEPS - 2:08d}",
        f"step_{2 * STEPS:08d}",
    ]  # keep-last-2 across phases


@pytest.mark.slow
def test_summary_reports_mfu_and_a_step_time_breakdown(straight):
    s = summary(straight)
    world, block, micro = s["world_size"], 128, 4
    for phase in (s["student"], s["scratch"]):
        assert phase["tokens"] == STEPS * micro * block * world
        assert phase["tokens_per_s"] == pytest.approx(phase["tokens"] / phase["train_time_s"], rel=0.01)
        assert 0 < phase["mfu"] <= 1, phase
        assert phase["mfu"] == pytest.approx(
            phase["tokens_per_s"] * phase["flops_per_token"] / (phase["peak_flops"] * world), rel=1e-6
        )
        br = phase["step_time_breakdown"]
        assert set(br["fractions"]) == {"data", "forward", "backward", "optimizer", "communication", "other"}
        assert sum(br["fractions"].values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(br["seconds"].values()) == pytest.approx(phase["train_time_s"], rel=1e-6)
        assert all(br["seconds"][k] > 0 for k in ("forward", "backward", "optimizer"))
    # the 2-block student trains (6N + 12*L*h*s) while the 4-block teacher only runs forward (2N + 4*L*h*s)
    n_s, n_t, seq = s["student_params"], s["teacher_params"], 128
    want = 6 * n_s + 12 * 2 * 128 * seq + 2 * n_t + 4 * 4 * 128 * seq
    assert s["student"]["flops_per_token"] == pytest.approx(want, rel=1e-9)
    assert s["scratch"]["flops_per_token"] == pytest.approx(6 * n_s + 12 * 2 * 128 * seq, rel=1e-9)
    assert s["mfu"] == s["student"]["mfu"] and s["peak_flops"] > 1e9  # a CPU core does more than a GFLOP/s


@pytest.mark.slow
def test_distill_student_zero3_8bit_frozen_checkpointed(teacher, tmp_path):
    out = str(tmp_path / "combo")
    extra = ["--optimizer", "adamw_8bit", "--freeze_embeddings", "true", "--gradient_checkpointing", "full"]
    extra += ["--scratch_baseline", "false", "--max_steps", "10", "--save_steps", "0", "--eval_steps", "100"]
    run(
        launch_cmd(
            "recipes/distill.py",
            BASE + ["--teacher_name_or_path", teacher, "--output_dir", out, *extra],
            deepspeed="configs/deepspeed/zero3.json",
        ),
        timeout=900,
    )
    s = summary(out)
    assert s["status"] == "completed" and s["zero_stage"] == 3 and s["optimizer"] == "adamw_8bit"
    st = s["student"]
    assert st["activation_checkpointing"]["mode"] == "full" and st["activation_checkpointing"]["checkpointed_blocks"]
    assert st["frozen_params"] > 0 and st["freezing"]["initial_frozen_params"] == st["frozen_params"]
    losses = [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0], losses
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors")) and s["scratch"] is None


# ---------------------------------------------------------------------------- the pieces, without a launch
def _fake_accelerator():
    import types

    def save_state(path):
        os.makedirs(path)

    return types.SimpleNamespace(
        is_main_process=True,
        is_local_main_process=False,  # no progress bar in the test output
        num_processes=1,
        device=torch.device("cpu"),
        wait_for_everyone=lambda: None,
        save_state=save_state,
        load_state=lambda path: None,
    )


def test_phases_share_one_checkpoint_dir_and_a_resume_keeps_the_log_of_earlier_phases(tmp_path):
    """Phase a (4 steps), then phase b preempted after its first step; lines a killed run wrote after the last
    checkpoint are dropped on resume, the earlier phase's lines (steps 3 and 4 > b's step 1) are kept."""
    import types

    from dsrecipes.train.loop import Loop, Session

    acc = _fake_accelerator()
    args = types.SimpleNamespace(
        output_dir=str(tmp_path),
        save_total_limit=3,
        resume_from=None,
        report_to="none",
        max_steps=4,
        logging_steps=1,
        eval_steps=2,
        save_steps=2,
    )
    stop = types.SimpleNamespace(requested=lambda acc: False)
    session = Session(acc, args, stop)
    a = Loop(session, args, phase="a")
    a.scheduler = types.SimpleNamespace(get_last_lr=lambda: [torch.tensor(0.5)])  # torchao keeps lr as a tensor
    losses = iter([4.0, 3.0, 2.0, 1.0])

    def step_a():
        a.count_tokens(8, 4)
        return next(losses), {"kd": 0.25}

    assert a.drive(step_a, evaluate=lambda: 9.0) is False
    assert a.step == 4 and a.first_loss == 4.0 and a.train_loss == 1.0 and a.eval_loss == 9.0
    stop.requested = lambda acc: True  # a signal arrives during phase b's first step
    b = Loop(session, args, phase="b", step_offset=args.max_steps, extra_state={"a_loss": a.train_loss})
    b.scheduler = a.scheduler
    assert b.drive(lambda: (5.0, {}), evaluate=lambda: 8.0) is True and b.step == 1
    ckpts = os.path.join(str(tmp_path), "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == [f"step_{i:08d}" for i in (2, 4, 5)]
    metrics = os.path.join(str(tmp_path), "metrics.jsonl")
    kept = read_jsonl(metrics)
    assert [(r["phase"], r["step"], "eval_loss" in r) for r in kept] == [
        ("a", 1, False),
        ("a", 2, False),
        ("a", 2, True),
        ("a", 3, False),
        ("a", 4, False),
        ("a", 4, True),
        ("b", 1, False),
    ]
    assert all(type(r["lr"]) is float and r["kd"] == 0.25 for r in kept if r["phase"] == "a" and "loss" in r)
    with open(metrics, "a") as fh:  # what a run killed after the checkpoint would have logged
        fh.write('{"phase": "b", "step": 2, "loss": 4.0}\n')
    args.resume_from = "latest"
    resumed = Session(acc, args, stop)
    assert resumed.phase == "b" and resumed.state["a_loss"] == 1.0 and resumed.resume_state("a") == {}
    assert read_jsonl(metrics) == kept
    again = Loop(resumed, args, phase="b", step_offset=args.max_steps)
    assert again.step == 1 and again.first_loss == 5.0 and again.resumed_from.endswith("step_00000005")
    s = a.summary()
    assert s["tokens"] == 32 and s["flops_per_token"] is None and s["mfu"] is None  # no FlopCounter given


def test_flops_per_token_is_6n_plus_the_attention_term():
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config
    from dsrecipes.train.throughput import FlopCounter, flops_per_token

    model = AutoModelForCausalLM.from_config(load_model_config("configs/models/tiny_gpt2.json", byte_tokenizer()))
    n = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert FlopCounter(train=[model]).per_token(128) == 6 * n + 12 * 4 * 128 * 128
    assert FlopCounter(forward=[model]).per_token(64) == 2 * n + 4 * 4 * 128 * 64
    assert FlopCounter(shapes=[(n, 4, 128)]).per_token(128) == flops_per_token(n, 4, 128, 128)


def test_step_timer_moves_nested_time_and_fractions_sum_to_one():
    import types

    from dsrecipes.train.throughput import StepTimer

    timer = StepTimer()
    engine = types.SimpleNamespace(step=lambda: time.sleep(0.02))
    timer.wrap_engine_step(engine)
    timer.wrap_engine_step(engine)  # once only
    with timer.part("backward"):
        time.sleep(0.01)
        engine.step()  # DeepSpeed's engine.step() inside accelerate's backward(): the optimizer's time
    assert timer.seconds["optimizer"] >= 0.02 and 0.01 <= timer.seconds["backward"] < 0.02
    br = timer.breakdown(total_s=0.05)
    assert sum(br["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
    assert br["seconds"]["other"] == pytest.approx(0.05 - timer.seconds["optimizer"] - timer.seconds["backward"])


def test_peak_flops_cpu_is_measured_without_touching_the_training_rng():
    from dsrecipes.train.throughput import peak_flops

    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    peak, source = peak_flops("cpu")
    assert torch.equal(torch.rand(3), want) and peak > 1e8 and source.startswith("measured fp32 matmul")


def test_gpu_table_has_a_dense_bf16_peak_column():
    from dsrecipes.memory.gpus import BF16_TFLOPS, GPUS, gpu_bf16_tflops

    assert set(BF16_TFLOPS) == set(GPUS)
    assert gpu_bf16_tflops("NVIDIA H200") == 989.0 and gpu_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert gpu_bf16_tflops("NVIDIA GeForce RTX 4090") == 165.2 and gpu_bf16_tflops("NVIDIA L40S") == 362.1
    assert gpu_bf16_tflops("NVIDIA L4") == 121.0 and gpu_bf16_tflops("NVIDIA A10") == 125.0
    assert gpu_bf16_tflops("Tesla T4") is None and gpu_bf16_tflops("Some Future GPU") is None  # no bf16 / unknown
