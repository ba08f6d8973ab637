"""The tiny default recipe (`make train`: configs/recipes/train_tiny_zero2.yaml) trains without loss spikes, issue 12:
for seeds 1-5, no logged step's loss (the mean over its logging window, train/loop.py) rises more than 20% above the
previous window's, and the loss falls.

Why single-process runs are the same test: `make train` runs 2 ranks x 8 sequences under ZeRO-2 in fp32. One
process with per_device_train_batch_size 16 updates on the very same 16 sequences per step (both ranks draw the same
shuffled order and accelerate hands rank r the batches r, r+2, ...: update k reads batches 2k and 2k+1, i.e. one
batch of 16), averages the same per-token losses (every block holds block_size tokens) into the same gradient, clips
the same global norm and takes the same AdamW step on the same schedule; ZeRO-2 partitions the optimizer state, not
the math (tests/test_train_lm.py: ZeRO 0-3 give the same curve). Only the dropout masks differ (one RNG stream per
rank), noise of the kind the five seeds sample anyway. So the five seeds run as parallel one-process runs.

What is logged: every step (--logging_steps 1), so a one-update spike cannot hide in a window: with the old
schedule (lr 3e-3 after 20 warm-up steps) seed 3's loss doubled at update 13 (3.60 -> 7.28) and was back at 3.23
one update later, invisible in the config's 10-step window means. The rule is checked on those one-step windows
and on the config's own logging_steps windows (each the mean of its steps' losses, as train/loop.py logs it).

Cost (~3 min on 2 cores): the runs stop at SPIKE_STEPS instead of max_steps. The spike window is the warm-up and the
peak lr after it (the known spikes: update 13 above; update 20 for seed 42 with the old zero.Init weights, where lr
peaked right at the end of warm-up). Up to the end of warm-up the lr is the full run's exactly (linear warm-up does
not depend on max_steps); after it the shorter cosine decays sooner, so the runs cover the peak, not the whole
plateau (the config's header has the full runs: seeds 1-5 at the old 300 steps, seed 42 at 900).

Run: .venv/bin/python -m pytest tests/test_loss_spikes.py -q -m slow
"""

import concurrent.futures
import math
import os

import pytest
import yaml

from conftest import ACCELERATE, ROOT, TINY, read_jsonl, run

SEEDS = (1, 2, 3, 4, 5)
SPIKE_STEPS = 120
MAX_RISE = 1.2  # a window's mean loss may be at most 20% above the previous window's


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(ROOT, TINY)) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, config):
    """seed -> (logged training records, summary) of one single-process run with the global batch of `make train`."""
    import json

    root = tmp_path_factory.mktemp("loss_spikes")
    assert (
        config["gradient_accumulation_steps"] == 1 and 3 * config["warmup_steps"] <= SPIKE_STEPS < config["max_steps"]
    )
    global_batch = config["per_device_train_batch_size"] * 2  # configs/accelerate/deepspeed_cpu_2proc.yaml: 2 ranks

    def one(seed):
        out = str(root / f"seed{seed}")
        cmd = [ACCELERATE, "launch", "--config_file", "configs/accelerate/cpu_1proc.yaml"]
        cmd += ["--num_cpu_threads_per_process", "1", "recipes/train_lm.py", "--config", TINY]
        cmd += ["--seed", str(seed), "--per_device_train_batch_size", str(global_batch), "--output_dir", out]
        cmd += ["--max_steps", str(SPIKE_STEPS), "--eval_steps", str(SPIKE_STEPS), "--save_steps", "0"]
        cmd += ["--logging_steps", "1"]
        cmd += ["--report_to", "none", "--export_final", "false"]
        run(cmd, timeout=900)
        records = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
        with open(os.path.join(out, "summary.json")) as fh:
            return records, json.load(fh)

    workers = max(1, min(len(SEEDS), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(SEEDS, pool.map(one, SEEDS)))


def windows(records, every: int) -> list[tuple[int, float]]:
    """(last step, mean loss) of each `every`-step logging window, from the one-step records."""
    losses = [r["loss"] for r in records]
    return [(i + every, sum(losses[i : i + every]) / every) for i in range(0, len(losses) - every + 1, every)]


@pytest.mark.slow
def test_the_runs_cover_the_spike_window(runs, config):
    for seed, (records, summary) in runs.items():
        assert [r["step"] for r in records] == list(range(1, SPIKE_STEPS + 1)), seed
        assert summary["status"] == "completed" and summary["steps"] == SPIKE_STEPS, seed
        warm = config["warmup_steps"]
        lrs = [r["lr"] for r in records[: warm + 1]]
        assert lrs[:warm] == pytest.approx([config["learning_rate"] * (i + 1) / warm for i in range(warm)]), seed
        assert max(r["lr"] for r in records) == pytest.approx(config["learning_rate"])  # the peak is in the runs


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_no_window_rises_more_than_20_percent(runs, config, seed):
    for every in (1, config["logging_steps"]):
        losses = windows(runs[seed][0], every)
        rises = [(step, round(b / a, 3)) for (_, a), (step, b) in zip(losses, losses[1:]) if b > MAX_RISE * a]
        assert rises == [], (seed, every, rises, losses)


@pytest.mark.slow
def test_the_loss_falls(runs, config):
    for seed, (records, summary) in runs.items():
        losses = [loss for _, loss in windows(records, config["logging_steps"])]
        assert all(math.isfinite(x) for x in losses), seed
        assert losses[-1] < 0.45 * losses[0], (seed, losses)
        assert summary["final_eval_loss"] < 0.8 * summary["unigram_entropy"], (seed, summary["final_eval_loss"])
