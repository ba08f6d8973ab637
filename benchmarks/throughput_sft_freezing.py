"""bench-throughput's realistic freezing rows: chat fine-tuning (recipes/sft.py) of the pretrained teacher on the
generated chat set of the language it was trained on, the case freezing is used for (AutoFreeze and Egeria measure
fine-tuning of pretrained models on downstream data of the same language).

Run: part of `make bench-throughput` (benchmarks/bench_throughput.py calls sft_freezing(launch, teacher_dir, quick)).

The model is the benchmark's teacher (GPT-2 8x128 pretrained on the generated language, seed 1234); the data is
dsrecipes.sft.generated (the assistant answers a word of that language with its most likely successor), the 2,000
conversations of `make sft` packed into 256-token rows (~141 steps an epoch at 4 rows a step), loss on assistant
tokens only, 450 steps at `make sft`'s lr 3e-3: long enough that the baseline reaches ~97% held-out exact match.
Five runs of the same steps, batches and seed, one process each: baseline, static + prefix cache (embeddings + first
half of the blocks frozen from the start; the cache skips their forward and changes no number), progressive (linear
schedule from 20% to 60% of the steps), progressive + cache, and progressive-late + cache (50% to 80%: the blocks
freeze after the baseline's fastest learning). Each reports training wall clock, non-padding tokens/s, the held-out
loss (assistant tokens of held-out conversations) and greedy exact match before and after.
Target: >= 1.5x training wall clock at <= 1% held-out loss increase, for the fastest variant within the bound.
"""

from __future__ import annotations

from dsrecipes.results import target

VARIANTS = [  # (name, recipe overrides); every run starts from the same teacher with the same data and seed
    ("baseline", ["--freeze_schedule", "none", "--freeze_cache", "none"]),
    ("static+cache", ["--freeze_embeddings", "true", "--freeze_first_n_blocks", "4", "--freeze_cache", "memory"]),
    ("progressive", ["--freeze_schedule", "linear", "--freeze_start", "0.2", "--freeze_end", "0.6"]),
    (
        "progressive+cache",
        ["--freeze_schedule", "linear", "--freeze_start", "0.2", "--freeze_end", "0.6", "--freeze_cache", "memory"],
    ),
    (
        "progressive-late+cache",
        ["--freeze_schedule", "linear", "--freeze_start", "0.5", "--freeze_end", "0.8", "--freeze_cache", "memory"],
    ),
]


def sft_args(teacher_dir: str, quick: bool) -> list[str]:
    """The chat fine-tune every variant runs: configs/recipes/sft_tiny.yaml (its 2,000 conversations, lr 3e-3) on the
    teacher, ~3.2 epochs, final eval only. 400 conversations seen 15 times instead: train loss 0.001, held-out 0.44
    and 72% exact match (memorised conversations); 150 steps at lr 1e-3: 12% exact match."""
    steps = 8 if quick else 450
    flags = {
        "model_name_or_path": teacher_dir,
        "generated_conversations": 60 if quick else 2000,
        "generated_eval_conversations": 20 if quick else 100,
        "block_size": 256,
        "packing": "true",
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "learning_rate": 0.003,
        "warmup_steps": 10,
        "logging_steps": 5,
        "eval_steps": 100000,
        "save_steps": 0,
        "report_to": "none",
        "freeze_cache_max_mb": 1024,
    }
    out = ["--config", "configs/recipes/sft_tiny.yaml"]
    for key, value in flags.items():
        out += [f"--{key}", str(value)]
    return out


def sft_freezing(launch, teacher_dir: str, quick: bool):
    """-> (rows, targets). `launch(name, script, args, nproc=1)` is bench_throughput's: it returns summary.json."""
    runs = {
        name: launch(f"sft_freeze_{name}", "recipes/sft.py", [*sft_args(teacher_dir, quick), *extra])
        for name, extra in VARIANTS
    }
    base = runs["baseline"]
    rows = []
    for name, s in runs.items():
        fz = s.get("freezing") or {}
        rows.append(
            {
                "part": "freezing (SFT)",
                "variant": name,
                "wall_clock_s": round(s["train_time_s"], 1),
                "tokens_per_s": round(s["real_tokens_per_s"], 1),
                "speedup": round(base["train_time_s"] / s["train_time_s"], 2),
                "cpu_speedup": round(base["run_cpu_s"] / s["run_cpu_s"], 2),
                "eval_loss": round(s["final_eval_loss"], 4),
                "eval_loss_increase_pct": round(100 * (s["final_eval_loss"] / base["final_eval_loss"] - 1), 2),
                "exact_match_before": round(s["exact_match_before"], 4),
                "exact_match": round(s["exact_match_after"], 4),
                "freeze_steps": [e["step"] for e in fz.get("events", [])] or None,
                "cache_hits": (fz.get("cache") or {}).get("hits"),
                "frozen_params_end": s.get("frozen_params"),
                "params": s["params"],
                "run_cpu_s": round(s["run_cpu_s"], 1),
                "padding_fraction": round(s["padding_fraction"], 4),
            }
        )
    others = [r for r in rows if r["variant"] != "baseline"]
    within = [r for r in others if r["eval_loss_increase_pct"] <= 1.0]
    best = max(within or others, key=lambda r: r["speedup"])
    return rows, [
        target(
            f"freezing on SFT of the pretrained model (same language; the realistic case): wall-clock speedup at <= 1% "
            f"held-out loss increase (best: {best['variant']}, held-out loss {best['eval_loss_increase_pct']:+.2f}%, "
            f"exact match {best['exact_match']:.1%} vs baseline {rows[0]['exact_match']:.1%}, "
            f"{'within' if within else 'none within'} the bound)",
            best["speedup"],
            ">= 1.5x with <= +1% held-out loss",
            best["speedup"] >= 1.5 and best["eval_loss_increase_pct"] <= 1.0,
        )
    ]
