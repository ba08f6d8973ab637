"""bench-throughput's baseline rows: recipes/train_lm.py against transformers.Trainer
(benchmarks/trainer_baseline.py) on the same tiny model, data, DeepSpeed ZeRO-2 JSON and 2 processes, two
alternating runs each, and the recipe's MFU and step-time breakdown.

Run: part of `make bench-throughput` (benchmarks/bench_throughput.py calls bench_trainer()).
Targets: recipe tokens/s >= 1.0x Trainer's; forward + backward + optimizer >= 85% of the recipe's training time.
"""

from __future__ import annotations

import json
import os

from dsrecipes.results import target
from throughput_common import WORK, ZERO2, S, launch

TRAINER_STEPS = S(80, 20)


def steady_tokens_per_s(run: str, from_step: int) -> float:
    """The recipe's training tokens/s between its step `from_step` and its last step (warm-up excluded)."""
    with open(os.path.join(WORK, run, "metrics.jsonl")) as fh:
        recs = {r["step"]: r for r in map(json.loads, fh) if "tokens_per_s" in r}
    last = max(recs)
    # the recipe logs cumulative tokens/s since its loop began: elapsed(k) = k * tokens_per_step / tokens_per_s(k)
    elapsed = {k: k / recs[k]["tokens_per_s"] for k in (from_step, last)}  # in units of 1 / tokens_per_step
    return (last - from_step) / (elapsed[last] - elapsed[from_step])


def bench_trainer():
    """Two recipe runs and two Trainer runs, alternating; each side's best steady-state tokens/s (steps 10..N)."""
    args = [
        "--config",
        "configs/recipes/train_tiny_zero2.yaml",
        "--max_steps",
        str(TRAINER_STEPS),
        "--report_to",
        "none",
        "--logging_steps",
        "10",
        "--eval_steps",
        "100000",
        "--save_steps",
        "0",
        "--export_final",
        "false",
    ]
    recipe, hf, summaries = [], [], []
    for i in range(2):
        summaries.append(launch(f"trainer_recipe{i}", "recipes/train_lm.py", args, nproc=2))
        recipe.append(steady_tokens_per_s(f"trainer_recipe{i}", 10))
        hf.append(
            launch(f"trainer_hf{i}", "benchmarks/trainer_baseline.py", [*args, "--deepspeed_json", ZERO2], nproc=2)[
                "steady_tokens_per_s"
            ]
        )
    ratio = max(recipe) / max(hf)
    rows = [
        {
            "part": "baseline",
            "variant": "recipes/train_lm.py",
            "tokens_per_s": round(max(recipe), 1),
            "runs_tokens_per_s": [round(x, 1) for x in recipe],
            "world_size": 2,
            "train_steps": TRAINER_STEPS,
        },
        {
            "part": "baseline",
            "variant": "transformers.Trainer",
            "tokens_per_s": round(max(hf), 1),
            "runs_tokens_per_s": [round(x, 1) for x in hf],
            "world_size": 2,
            "train_steps": TRAINER_STEPS,
        },
    ]
    # MFU and where the step time goes, from the recipe's own summary (dsrecipes.train.throughput), faster run
    best = summaries[recipe.index(max(recipe))]
    frac = best["step_time_breakdown"]["fractions"]
    compute = frac["forward"] + frac["backward"] + frac["optimizer"]
    rows.append(
        {
            "part": "baseline",
            "variant": "recipes/train_lm.py: MFU and step-time breakdown",
            "mfu": round(best["mfu"], 4),
            "peak_gflops": round(best["peak_flops"] / 1e9, 1),
            **{f"{k}_pct": round(100 * v, 2) for k, v in frac.items()},
            "world_size": 2,
            "train_steps": TRAINER_STEPS,
        }
    )
    return rows, [
        target(
            "baseline: recipe tokens/s / HF Trainer tokens/s (same model, data, ZeRO-2 JSON, 2 procs; "
            "steps 10..N, best of 2 alternating runs each)",
            round(ratio, 3),
            ">= 1.0x",
            ratio >= 1.0,
        ),
        target(
            "baseline: forward + backward + optimizer share of the recipe's training time (the make train model; "
            "the rest is data, the loop's collectives, logging and eval: overhead we own)",
            round(compute, 4),
            ">= 0.85",
            compute >= 0.85,
        ),
    ]
