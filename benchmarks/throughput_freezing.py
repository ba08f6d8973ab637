"""bench-throughput's freezing rows on a new language (the worst case for freezing: the early layers must change):
the teacher fine-tuned by recipes/train_lm.py on a second generated language (generated_seed 4321) five ways
(baseline, static, progressive, progressive + prefix cache, progressive-late + cache, adaptive + cache), and the
in-process step cost with 0, 4 and 7 of 8 blocks frozen, without and with the cache.

Run: part of `make bench-throughput` (benchmarks/bench_throughput.py calls bench_freezing(teacher_dir)).
Target: >= 1.5x wall clock at <= 1% eval-loss increase, for the fastest variant within the bound.
"""

from __future__ import annotations

import statistics
import time

import torch

from dsrecipes.results import target
from throughput_common import COMMON, S, launch

FT_STEPS = S(150, 8)
FT_DATA = [
    "--generated_seed",
    "4321",
    "--generated_docs",
    S("200", "30"),
    "--eval_docs",
    S("100", "20"),
    "--learning_rate",
    "0.001",
    "--warmup_steps",
    "10",
    "--eval_steps",
    "100000",
]
FREEZE_VARIANTS = [  # (name, recipe YAML giving the freezing keys, overrides)
    (
        "baseline",
        "configs/recipes/freeze_tiny_progressive.yaml",
        ["--freeze_schedule", "none", "--freeze_cache", "none"],
    ),
    ("static", "configs/recipes/freeze_tiny_static.yaml", ["--freeze_first_n_blocks", "4", "--freeze_cache", "none"]),
    ("progressive", "configs/recipes/freeze_tiny_progressive.yaml", ["--freeze_cache", "none"]),
    ("progressive+cache", "configs/recipes/freeze_tiny_progressive.yaml", []),
    # late: FreezeOut's own default t0 = 0.5 (freezing starts at half the run): gentler, less speedup, less loss
    (
        "progressive-late+cache",
        "configs/recipes/freeze_tiny_progressive.yaml",
        ["--freeze_start", "0.5", "--freeze_end", "0.9"],
    ),
    # intervals of 25 steps (about 0.6 epoch): shorter ones are too noisy for block 0 to ever pass the test
    (
        "adaptive+cache",
        "configs/recipes/freeze_tiny_adaptive.yaml",
        ["--freeze_cache", "memory", "--freeze_check_steps", "25"],
    ),
]


def bench_freezing(teacher_dir: str):
    runs = {}
    for name, yaml, extra in FREEZE_VARIANTS:
        runs[name] = launch(
            f"freeze_{name}",
            "recipes/train_lm.py",
            [
                "--config",
                yaml,
                *COMMON,
                *FT_DATA,
                "--model_name_or_path",
                teacher_dir,
                "--max_steps",
                str(FT_STEPS),
                *extra,
            ],
        )
    base = runs["baseline"]
    rows = []
    for name, s in runs.items():
        fz = s.get("freezing") or {}
        rows.append(
            {
                "part": "freezing",
                "variant": name,
                "wall_clock_s": round(s["train_time_s"], 1),
                "tokens_per_s": round(s["tokens_per_s"], 1),
                "eval_loss": round(s["final_eval_loss"], 4),
                "eval_loss_increase_pct": round(100 * (s["final_eval_loss"] / base["final_eval_loss"] - 1), 2),
                "speedup": round(base["train_time_s"] / s["train_time_s"], 2),
                "run_cpu_s": round(s["run_cpu_s"], 1),
                "cpu_speedup": round(base["run_cpu_s"] / s["run_cpu_s"], 2),
                "frozen_params_end": s["frozen_params"],
                "params": s["params"],
                "freeze_steps": [e["step"] for e in fz.get("events", [])] or None,
                "cache_hits": (fz.get("cache") or {}).get("hits"),
                "frozen_weights_unchanged": fz.get("frozen_weights_unchanged"),
            }
        )
    rows += freezing_step_costs(teacher_dir, repeats=S(7, 2))
    # the target on a new language: the worst case for freezing (kept as a row; the realistic case is part 2b)
    # The target holds if any freezing variant is >= 1.5x faster with <= 1% more eval loss. Value: the fastest
    # variant within the loss bound, else the fastest variant overall, named with its loss increase.
    runs_ = [r for r in rows if r["part"] == "freezing" and r["variant"] != "baseline"]
    within = [r for r in runs_ if r["eval_loss_increase_pct"] <= 1.0]
    best = max(within or runs_, key=lambda r: r["speedup"])
    targets = [
        target(
            "freezing on a new generated language (the worst case for freezing): wall-clock speedup at <= 1% "
            f"eval-loss increase (best: {best['variant']}, eval loss "
            f"{best['eval_loss_increase_pct']:+.2f}%, {'within' if within else 'none within'} the bound)",
            best["speedup"],
            ">= 1.5x with <= +1% eval loss",
            best["speedup"] >= 1.5 and best["eval_loss_increase_pct"] <= 1.0,
        )
    ]
    return rows, targets


def freezing_step_costs(teacher_dir: str, repeats: int) -> list[dict]:
    """Training-step time (forward, backward, AdamW) with 0, 4 and 7 of 8 blocks frozen, without and with the prefix
    cache, all in this process, rounds interleaved, median per setting: what freezing buys per step, free of the
    load differences between the sequential runs above."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.freezing.freezer import embedding_modules, untie_output_head
    from dsrecipes.freezing.prefix_cache import PrefixCache
    from dsrecipes.train.models import transformer_blocks

    torch.set_num_threads(1)
    setups = {}
    for k, cached in ((0, False), (4, False), (4, True), (7, False), (7, True)):
        m = AutoModelForCausalLM.from_pretrained(teacher_dir).train()
        if k:
            untie_output_head(m)
            for mod in embedding_modules(m) + list(transformer_blocks(m)[:k]):
                mod.requires_grad_(False)
        if cached:
            PrefixCache(m, "memory").activate(k)
        setups[(k, cached)] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5))
    x = torch.randint(0, 257, (8, 128), generator=torch.Generator().manual_seed(0))
    times = {key: [] for key in setups}
    for r in range(repeats + 1):  # round 0 warms up (and fills the caches)
        for key, (m, opt) in setups.items():
            t0 = time.perf_counter()
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            if r:
                times[key].append(time.perf_counter() - t0)
    base = statistics.median(times[(0, False)])
    return [
        {
            "part": "freezing step cost",
            "variant": f"{k} of 8 blocks frozen{' + cache' if c else ''}",
            "step_s": round(statistics.median(v), 4),
            "speedup": round(base / statistics.median(v), 2),
        }
        for (k, c), v in times.items()
    ]
