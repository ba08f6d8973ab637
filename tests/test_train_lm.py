"""recipes/train_lm.py for real: ZeRO 0-3 + offload with 1 and 2 processes, exact resume, crash-safe checkpoints,
the exported final/ model, and one-line errors for bad input.

Run: .venv/bin/python -m pytest tests/test_train_lm.py -q
     (about 5 minutes on a quiet machine; ZeRO-Offload JIT-compiles
cpu_adam once, about 3.5 minutes more on a fresh machine)
"""

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, TINY, launch_cmd, read_jsonl, run, summary, tiny_run, train_curve

STEPS = 8
COMMON = tiny_run()
STAGES = ["zero0", "zero1", "zero2", "zero3", "zero2_offload"]
_runs: dict = {}


def train(tmp_root, stage: str, nproc: int, *extra, **env):
    key = (stage, nproc, extra)
    if key not in _runs:
        out = os.path.join(tmp_root, f"{stage}_{nproc}p_{len(_runs)}")
        cmd = launch_cmd(
            "recipes/train_lm.py",
            COMMON + ["--output_dir", out, *extra],
            deepspeed=f"configs/deepspeed/{stage}.json",
            num_processes=nproc,
        )
        run(cmd, timeout=900, **env)
        _runs[key] = out
    return _runs[key]


def train_zero3_init(tmp_root, nproc: int) -> str:
    """ZeRO-3 with zero3_init_flag: true (the model is built sharded, under deepspeed.zero.Init)."""
    key = ("zero3_init", nproc, ())
    if key not in _runs:
        with open(os.path.join(ROOT, "configs/accelerate/deepspeed_cpu_2proc.yaml")) as fh:
            text = fh.read()
        assert "zero3_init_flag: false" in text
        yaml_path = os.path.join(tmp_root, "deepspeed_cpu_zero3_init.yaml")
        with open(yaml_path, "w") as fh:
            fh.write(text.replace("zero3_init_flag: false", "zero3_init_flag: true"))
        out = os.path.join(tmp_root, f"zero3_init_{nproc}p_{len(_runs)}")
        cmd = launch_cmd(
            "recipes/train_lm.py",
            COMMON + ["--output_dir", out],
            accelerate_config=yaml_path,
            deepspeed="configs/deepspeed/zero3.json",
            num_processes=nproc,
        )
        run(cmd, timeout=900)
        _runs[key] = out
    return _runs[key]


def eval_losses(output_dir: str) -> list[tuple[int, float]]:
    records = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train_lm"))


# ---------------------------------------------------------------------------- ZeRO stages agree
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_zero_stages_give_the_same_loss_curve(tmp_root, nproc):
    curves = {s: train_curve(train(tmp_root, s, nproc)) for s in STAGES}
    ref = curves["zero0"]
    assert len(ref) == STEPS and ref[-1][1] < ref[0][1]
    for stage in ("zero1", "zero2", "zero3"):
        # Same math, same data; with 2 ranks the partitioned reductions sum in another order (last-bit noise).
        assert [d for _, _, d in curves[stage]] == [d for _, _, d in ref], f"{stage}: other data order"
        assert all(abs(a[1] - b[1]) <= 1e-5 * abs(b[1]) for a, b in zip(curves[stage], ref)), (
            stage,
            nproc,
            curves[stage],
            ref,
        )
    # DeepSpeedCPUAdam is another implementation of the same update: equal to float tolerance, same data.
    off = curves["zero2_offload"]
    assert [d for _, _, d in off] == [d for _, _, d in ref]
    assert all(abs(a[1] - b[1]) < 2e-3 for a, b in zip(off, ref)), (off, ref)
    for stage in STAGES:
        s = summary(_runs[(stage, nproc, ())])
        assert s["status"] == "completed" and s["world_size"] == nproc and s["steps"] == STEPS
        assert s["zero_stage"] == int(stage[4])
    # Built sharded (zero3_init_flag: true): the same weights, so bit for bit the ZeRO-3 run, train and eval.
    sharded = train_zero3_init(tmp_root, nproc)
    assert train_curve(sharded) == curves["zero3"], (nproc, train_curve(sharded), curves["zero3"])
    assert eval_losses(sharded) == eval_losses(_runs[("zero3", nproc, ())]) and eval_losses(sharded)
    assert summary(sharded)["status"] == "completed" and summary(sharded)["zero_stage"] == 3


@pytest.mark.slow
def test_two_processes_split_the_data(tmp_root):
    one = train_curve(train(tmp_root, "zero2", 1))
    two = train_curve(train(tmp_root, "zero2", 2))
    assert [d for _, _, d in one] != [d for _, _, d in two]  # rank 0 sees other batches when the data is split
    s1, s2 = summary(_runs[("zero2", 1, ())]), summary(_runs[("zero2", 2, ())])
    assert s1["train_blocks"] == s2["train_blocks"]
    for s, world in ((s1, 1), (s2, 2)):  # every rank's micro-batches counted; the rate is tokens over training time
        assert s["tokens"] == STEPS * 4 * 128 * world
        assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["train_time_s"], rel=0.01)


# ---------------------------------------------------------------------------- exported model
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_final_model_loads_and_gives_the_engine_eval_loss(tmp_root, stage):

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets

    out = train(tmp_root, stage, 2)
    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, eval_ds, _ = build_lm_datasets(args, tok)
    with torch.no_grad():
        losses = [
            model(input_ids=eval_ds[i : i + 16]["input_ids"], labels=eval_ds[i : i + 16]["labels"]).loss
            * len(eval_ds[i : i + 16]["input_ids"])
            for i in range(0, len(eval_ds), 16)
        ]
    loss = float(sum(losses) / len(eval_ds))
    assert abs(loss - summary(out)["final_eval_loss"]) < 1e-4


# ---------------------------------------------------------------------------- exact resume, crash-safe save
@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume_is_exact(tmp_root):
    straight = train(tmp_root, "zero2", 2)
    out = os.path.join(tmp_root, "crashy")
    base = COMMON + ["--output_dir", out]
    # Die (SIGKILL) inside the step-8 checkpoint write: after save_state, before the rename.
    proc = run(
        launch_cmd("recipes/train_lm.py", base, deepspeed="configs/deepspeed/zero2.json"),
        check=False,
        DSRECIPES_FAULT_KILL_IN_SAVE=STEPS,
    )
    assert proc.returncode != 0
    ckpts = os.path.join(out, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000004"
    assert os.path.isdir(os.path.join(ckpts, ".tmp-step_00000008"))  # the half-written one, never renamed
    assert not os.path.exists(os.path.join(out, "summary.json"))
    # Resume from the last good checkpoint and finish: same losses, same data, bit for bit.
    run(launch_cmd("recipes/train_lm.py", base + ["--resume_from", "latest"], deepspeed="configs/deepspeed/zero2.json"))
    assert train_curve(out) == train_curve(straight)
    assert summary(out)["resumed_from"].endswith("step_00000004")
    assert not os.path.exists(os.path.join(ckpts, ".tmp-step_00000008"))
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == ["step_00000004", "step_00000008"]


@pytest.mark.slow
def test_resaving_a_step_swaps_it_atomically(tmp_path):
    """A resumed run saves a step that exists already: the old copy is moved aside, never deleted before the new one
    is in place; a crash between the two renames leaves the old copy, which the next start puts back."""
    import types

    from dsrecipes.train.checkpoints import STATE_FILE, Checkpoints

    def save_state(path):
        os.makedirs(path)
        with open(os.path.join(path, "weights"), "w") as fh:
            fh.write(acc.tag)

    acc = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state, tag="a")
    ck = Checkpoints(acc, str(tmp_path), keep_last=2)
    ck.save(4, {"step": 4})
    acc.tag = "b"
    path = ck.save(4, {"step": 4, "again": True})
    assert ck.latest() == path and open(os.path.join(path, "weights")).read() == "b"
    assert sorted(os.listdir(ck.root)) == ["latest", "step_00000004"]
    os.replace(path, os.path.join(ck.root, ".old-step_00000004"))  # as if killed between the two renames
    os.makedirs(os.path.join(ck.root, ".tmp-step_00000004"))
    ck = Checkpoints(acc, str(tmp_path))
    assert ck.latest() == path and os.path.isfile(os.path.join(path, STATE_FILE))
    assert sorted(os.listdir(ck.root)) == ["latest", "step_00000004"]


@pytest.mark.slow  # 2-rank launches (it had no mark: `make test-fast` ran it)
def test_sigusr1_checkpoints_and_resume_matches_straight_run(tmp_root, straight_preempt_run):
    import psutil

    from conftest import PREEMPT_RUN, child_env

    # the straight 40-step run is shared with tests/test_faults.py's Ctrl-C test (conftest.straight_preempt_run)
    straight = straight_preempt_run
    out = os.path.join(tmp_root, "preempted")
    base = PREEMPT_RUN + ["--output_dir", out]
    cmd = launch_cmd("recipes/train_lm.py", base, deepspeed="configs/deepspeed/zero2.json")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(metrics):
        time.sleep(0.05)
    # Signal the training ranks (as SLURM's --signal does), not the launcher.
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "recipes/train_lm.py" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    for p in workers:
        p.send_signal(signal.SIGUSR1)
    out_text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out_text[-3000:]
    s = summary(out)
    assert s["status"] == "preempted" and 0 < s["steps"] < 40, s
    assert "resume with --resume_from latest" in out_text
    run(launch_cmd("recipes/train_lm.py", base + ["--resume_from", "latest"], deepspeed="configs/deepspeed/zero2.json"))
    assert train_curve(out) == train_curve(straight)
    assert summary(out)["status"] == "completed"


# ---------------------------------------------------------------------------- learns, and make-train defaults
@pytest.mark.slow
def test_loss_falls_well_below_unigram_entropy(tmp_path):
    out = str(tmp_path / "learn")
    run(
        launch_cmd(
            "recipes/train_lm.py",
            [
                "--config",
                TINY,
                "--max_steps",
                "60",
                "--output_dir",
                out,
                "--report_to",
                "tensorboard",
                "--save_steps",
                "0",
                "--eval_steps",
                "30",
            ],
            accelerate_config="configs/accelerate/cpu_1proc.yaml",
        )
    )
    s = summary(out)
    assert s["final_eval_loss"] < 0.85 * s["unigram_entropy"], s
    assert os.listdir(os.path.join(out, "tensorboard"))  # tracker wrote event files
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))


# ---------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config", "configs/recipes/nope.yaml"], "error: configs/recipes/nope.yaml: --config: file not found"),
        (["--config", "BADYAML"], "invalid YAML"),
        (
            ["--config", TINY, "--model_name_or_path", "/nonexistent/model"],
            "error: <args>: model_name_or_path: cannot load",
        ),
        (["--config", "UNKNOWNKEY"], "learning_rat: unknown key"),
        (["--config", TINY, "--max_stepz", "3"], "error: <cli>: --max_stepz: unknown argument"),
        (["--config", TINY, "--optimizer", "sgd"], "invalid choice"),
        (["--config", TINY, "--dataset", "missing.jsonl"], "error: <args>: dataset: file not found: 'missing.jsonl'"),
        (["--config", "STRINGNUM"], "max_steps: expected a number, got str '10'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    import sys

    files = {"BADYAML": "max_steps: [1,\n", "UNKNOWNKEY": "learning_rat: 0.1\n", "STRINGNUM": "max_steps: '10'\n"}
    if args[1] in files:
        path = tmp_path / "r.yaml"
        path.write_text(files[args[1]])
        args = ["--config", str(path)]
    proc = run(
        [sys.executable, "recipes/train_lm.py", *args, "--output_dir", str(tmp_path / "o")], check=False, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
