"""Pipeline rows of the throughput benchmark: measured bubble (idle) fraction vs (p-1)/(m+p-1), and tokens/s.

Run alone:  .venv/bin/python benchmarks/throughput_pipeline.py [--quick]
    (prints rows + target; ~4 min on 2 idle cores)
Used by:    benchmarks/bench_throughput.py (`make bench-throughput`), which imports pipeline_rows() and writes
            docs/results/throughput.{md,json,png} through dsrecipes.results.write_results.

Each row is one real run of the documented launch line (accelerate launch, 2 CPU processes = 2 stages, ZeRO-1)
of recipes/train_pipeline.py on a GPT-2 of 8 blocks x 256 hidden (4 blocks per stage, so each stage's compute,
~0.1-0.3 s per micro-batch, dwarfs the 0.5 MB activation it sends), for m = 1, 2, 4, 8 micro-batches of
4 x 128 tokens. The recipe's BubbleMeter times the engine's own instructions on every stage:
    busy = ForwardPass + BackwardPass;  window = train_batch start -> all stages done with their last backward;
    a step's idle fraction = mean over stages of (window - busy) / window;
    bubble_measured = the median over 7 steps after 1 warm-up step (bubble_pooled = sum of idle / sum of window,
    also shown: on a shared 2-core machine a burst of other load inflates a few steps, which moves the median less).
Target: |bubble_measured - formula| <= 0.10 x formula for every m (relative 10%). One more row runs the same model
unsplit in 1 process (m = 8) so tokens/s can be compared with what pipelining 2 cores buys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_BATCHES = (1, 2, 4, 8)
STEPS = 8  # the first is warm-up (shape exchange, buffer allocation) and is not measured: 7 measured steps
MODEL = {
    "model_type": "gpt2",
    "n_layer": 8,
    "n_embd": 256,
    "n_head": 8,
    "n_positions": 128,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "tie_word_embeddings": True,
}


def _run(workdir: str, name: str, micro_batches: int, stages: int, steps: int = STEPS) -> dict:
    out = os.path.join(workdir, name)
    model_config = os.path.join(workdir, "model.json")
    with open(model_config, "w") as fh:
        json.dump(MODEL, fh)
    from dsrecipes.launching import child_env, launch_cmd  # here: run alone, __main__ puts src/ on sys.path first

    cmd = launch_cmd(
        "recipes/train_pipeline.py",
        [
            "--config",
            "configs/recipes/pipeline_tiny.yaml",
            "--model_config",
            model_config,
            "--num_stages",
            str(stages),
            "--gradient_accumulation_steps",
            str(micro_batches),
            "--max_steps",
            str(steps),
            "--logging_steps",
            str(steps),
            "--eval_steps",
            str(steps),
            "--max_eval_batches",
            "1",
            "--save_steps",
            "0",
            "--warmup_steps",
            "1",
            "--generated_docs",
            "400",
            "--eval_docs",
            "20",
            "--export_final",
            "false",
            "--report_to",
            "none",
            "--output_dir",
            out,
        ],
        "configs/accelerate/deepspeed_cpu_2proc.yaml",
        deepspeed="configs/deepspeed/zero1.json",
        num_processes=stages,
    )
    env = child_env()
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    b = s["bubble"]
    row = {
        "stages": stages,
        "micro_batches": micro_batches,
        "tokens_per_step": s["tokens_per_step"],
        "step_time_s": b["step_time_s"],
        "tokens_per_s": s["tokens_per_step"] / b["step_time_s"],
        "measured_steps": b["measured_steps"],
        "final_loss": s["final_loss"],
        "load_avg_1m": round(load, 2),
    }
    if stages > 1:
        measured = b["bubble_measured_median"]
        dev = abs(measured - b["bubble_formula"]) / b["bubble_formula"]
        # Diagnostic, not the target: the bubble that the measured per-stage compute t_s alone implies
        # (window = (m-1) max t_s + sum t_s for 1F1B; equal t_s give the formula). Above it = waiting beyond
        # imbalance (p2p, launch jitter, other load); the gap between it and the formula = stage imbalance.
        t = [x / micro_batches for x in b["stage_busy_s"]]
        window = (micro_batches - 1) * max(t) + sum(t)
        implied = sum(window - micro_batches * x for x in t) / (len(t) * window)
        row.update(
            bubble_formula=b["bubble_formula"],
            bubble_measured=measured,
            rel_deviation=dev,
            bubble_pooled=b["bubble_measured"],
            bubble_per_step=b["bubble_per_step"],
            bubble_from_stage_times=implied,
            within_10pct=dev <= 0.10,
            stage_idle=[round(x, 4) for x in b["stage_idle_fraction"]],
            stage_p2p=[round(x, 4) for x in b["stage_p2p_fraction"]],
            stage_busy_s=[round(x, 4) for x in b["stage_busy_s"]],
        )
    return row


def pipeline_rows(quick: bool = False) -> tuple[list[dict], list[dict]]:
    """-> (rows, targets). Rows: one per m with 2 stages, then the 1-process reference (m = 8).
    quick: 4 steps per run (3 measured) and no 1-process row, for a fast smoke of the benchmark."""
    steps = 4 if quick else STEPS
    from dsrecipes.results import target

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as workdir:
        for m in MICRO_BATCHES:
            rows.append({"row": f"pipeline p=2 m={m}", **_run(workdir, f"p2_m{m}", m, 2, steps)})
        if not quick:
            rows.append({"row": "no pipeline (1 process) m=8", **_run(workdir, "p1_m8", 8, 1, steps)})
    piped = [r for r in rows if r["stages"] == 2]
    worst = max(r["rel_deviation"] for r in piped)
    targets = [
        target(
            "pipeline bubble within 10% of (p-1)/(m+p-1), m=1,2,4,8",
            round(worst, 4),
            "max |measured - formula| / formula <= 0.10",
            all(r["within_10pct"] for r in piped),
        )
    ]
    return rows, targets


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from dsrecipes.results import markdown_table

    rows, targets = pipeline_rows(quick="--quick" in sys.argv)
    cols = [
        "row",
        "bubble_formula",
        "bubble_measured",
        "rel_deviation",
        "within_10pct",
        "bubble_pooled",
        "bubble_from_stage_times",
        "stage_idle",
        "stage_p2p",
        "stage_busy_s",
        "step_time_s",
        "tokens_per_s",
        "load_avg_1m",
    ]
    print(markdown_table(rows, cols))
    print(markdown_table(targets, ["name", "value", "goal", "met"]))
    print(json.dumps({"rows": rows, "targets": targets}, indent=1))
