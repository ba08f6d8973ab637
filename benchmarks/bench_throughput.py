"""Throughput benchmark (book ch. 8): layer freezing, distillation, the pipeline bubble and the HF Trainer baseline,
measured side by side in one run on this machine.

Run:  make bench-throughput      (= .venv/bin/python benchmarks/bench_throughput.py; BENCH_QUICK=1 for a smoke run)
Produces: docs/results/throughput.{md,json,png} (machine, versions, rows, targets) via dsrecipes.results;
work files (runs, logs, models) under outputs/bench_throughput/.

What runs (each a real `accelerate launch` of the recipe, 1 process x 1 thread unless noted, one after another):
1. teacher (benchmarks/throughput_teacher.py): recipes/train_lm.py trains GPT-2 8x128 (configs/models/gpt2_8x128.json)
   on the generated language, 2 processes, 6000 steps on 20,000 documents, with an eval every 250 steps: its curve,
   and the last quarter's eval-loss gain (converged: <= 1%), next to the language's entropy rate and unigram entropy.
   A later bench with the same teacher arguments, code and versions reuses that run (BENCH_FRESH_TEACHER=1 retrains).
2. freezing (benchmarks/throughput_freezing.py): that model fine-tuned on a second generated language (another
   generated_seed) six ways: baseline, static (embeddings + first half of the blocks), progressive (linear schedule),
   progressive + prefix cache, progressive-late + cache and adaptive + cache; wall clock, tokens/s and final eval
   loss. Target: >= 1.5x speedup at <= 1% eval-loss increase for some variant (the fastest within the loss bound is
   reported; all rows are in the table). A new language is the worst case for freezing (the early layers must
   change); it is kept, labelled as such.
2b. freezing on SFT (benchmarks/throughput_sft_freezing.py): recipes/sft.py fine-tunes the same teacher on the
   generated chat set of its own language (450 steps), baseline / static + cache / progressive / progressive + cache
   / progressive-late + cache: wall clock, held-out loss and exact match. The same target, on the case freezing is
   used for.
3. distillation: recipes/distill.py, 8 -> 4 layers initialised from every other teacher block, plus the same student
   from scratch for the same steps; inference tokens/s measured here, interleaved. Targets: quality (teacher ppl /
   student ppl) >= 0.97, inference speed >= 1.9x, distilled beats scratch.
4. pipeline: rows and targets from benchmarks/throughput_pipeline.py (the pipeline recipe's own measurement).
5. baseline (benchmarks/throughput_trainer.py): recipes/train_lm.py vs transformers.Trainer
   (benchmarks/trainer_baseline.py), same tiny model, data, DeepSpeed ZeRO-2 JSON and 2 processes. Target: recipe
   tokens/s >= 1.0x Trainer's.
"""

import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from dsrecipes.results import target, write_results  # noqa: E402
from throughput_common import COMMON, QUICK, WORK, S, launch  # noqa: E402
from throughput_freezing import FT_STEPS, bench_freezing  # noqa: E402
from throughput_pipeline import pipeline_rows  # noqa: E402
from throughput_sft_freezing import sft_freezing  # noqa: E402
from throughput_teacher import TEACHER_STEPS, bench_teacher  # noqa: E402
from throughput_trainer import bench_trainer  # noqa: E402

DISTILL_STEPS = S(300, 6)
# DISTILL_STEPS: against the 2400-step 8x128 teacher (0.271), 100 steps gave quality 0.930 and 300 steps 0.9735;
# against the 6000-step one (0.2494), 300 steps give 0.979
COLUMNS = [
    "part",
    "variant",
    "wall_clock_s",
    "tokens_per_s",
    "speedup",
    "cpu_speedup",
    "step_s",
    "eval_loss",
    "eval_loss_increase_pct",
    "freeze_steps",
    "cache_hits",
    "exact_match",
    "layers",
    "params",
    "inference_tokens_per_s",
    "eval_ppl",
    "quality",
    "bubble_formula",
    "bubble_measured",
    "rel_deviation",
    "mfu",
    "data_pct",
    "forward_pct",
    "backward_pct",
    "optimizer_pct",
    "communication_pct",
    "other_pct",
]  # the Markdown table; the JSON has every field


# ----------------------------------------------------------------------------- 3. distillation
def inference_tokens_per_s(dirs: dict, repeats: int) -> dict:
    """Forward-only tokens/s of each model, batch 8 x 128, one thread, rounds interleaved, median per model."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    models = {k: AutoModelForCausalLM.from_pretrained(d).eval() for k, d in dirs.items()}
    x = torch.randint(0, 257, (8, 128), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=x)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=x)
                times[k].append(time.perf_counter() - t0)
    return {k: x.numel() / statistics.median(v) for k, v in times.items()}


def bench_distillation(teacher_dir: str):
    s = launch(
        "distill",
        "recipes/distill.py",
        [
            "--config",
            "configs/recipes/distill_tiny_4to2.yaml",
            *COMMON,
            "--teacher_name_or_path",
            teacher_dir,
            "--student_num_layers",
            "4",
            "--max_steps",
            str(DISTILL_STEPS),
            "--generated_docs",
            S("2000", "100"),
            "--eval_docs",
            S("100", "20"),
            "--learning_rate",
            "0.001",
            "--warmup_steps",
            "10",
            "--eval_steps",
            "100000",
        ],
    )
    speed = inference_tokens_per_s(
        {"teacher": teacher_dir, "student": os.path.join(WORK, "distill", "final")}, repeats=S(15, 3)
    )
    t_ppl = s["teacher"]["eval_ppl"]
    rows = [
        {
            "part": "distillation",
            "variant": "teacher",
            "layers": s["teacher_layers"],
            "params": s["teacher_params"],
            "inference_tokens_per_s": round(speed["teacher"], 1),
            "eval_loss": round(s["teacher"]["eval_loss"], 4),
            "eval_ppl": round(t_ppl, 4),
            "quality": 1.0,
        }
    ]
    for name, key in (("distilled student", "student"), ("scratch student", "scratch")):
        r = s[key]
        rows.append(
            {
                "part": "distillation",
                "variant": name,
                "layers": s["student_layers"],
                "params": s["student_params"],
                "inference_tokens_per_s": round(speed["student"], 1),
                "eval_loss": round(r["eval_loss"], 4),
                "eval_ppl": round(r["eval_ppl"], 4),
                "quality": round(t_ppl / r["eval_ppl"], 4),
                "train_steps": DISTILL_STEPS,
                "wall_clock_s": round(r["train_time_s"], 1),
            }
        )
    quality, speedup = t_ppl / s["student"]["eval_ppl"], speed["student"] / speed["teacher"]
    margin = s["scratch"]["eval_loss"] - s["student"]["eval_loss"]
    targets = [
        target(
            "distillation: student (half the layers) quality, teacher ppl / student ppl",
            round(quality, 4),
            ">= 0.97",
            quality >= 0.97,
        ),
        target(
            "distillation: student inference speedup over the teacher", round(speedup, 3), ">= 1.9x", speedup >= 1.9
        ),
        target(
            "distillation: scratch-student eval loss minus distilled-student eval loss (same steps)",
            round(margin, 4),
            "> 0 (distilled beats scratch)",
            margin > 0,
        ),
    ]
    return rows, targets


# ----------------------------------------------------------------------------- 4. pipeline (the other recipe's rows)
def bench_pipeline():
    if QUICK:
        return [], [], "pipeline rows skipped in the quick smoke run."
    rows, targets = pipeline_rows()
    return [dict(r, part="pipeline", variant=r.get("row")) for r in rows], targets, ""


def plot(rows):
    def draw(path):
        import matplotlib.pyplot as plt

        def bars_and_dots(ax, part, bar_key, bar_label, dot_key, dot_label, title, color):
            sel = [r for r in rows if r["part"] == part]
            ax.bar([r["variant"] for r in sel], [r[bar_key] for r in sel], color=color)
            ax.set_ylabel(bar_label)
            ax.set_title(title)
            ax.tick_params(axis="x", rotation=20)
            ax2 = ax.twinx()
            ax2.plot([r["variant"] for r in sel], [r[dot_key] for r in sel], "o", color="tab:red")
            ax2.set_ylabel(dot_label)

        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
        bars_and_dots(
            axes[0],
            "freezing",
            "wall_clock_s",
            "fine-tune wall clock (s)",
            "eval_loss",
            "final eval loss",
            "freezing: wall clock (bars), eval loss (dots)",
            "tab:blue",
        )
        bars_and_dots(
            axes[1],
            "freezing (SFT)",
            "wall_clock_s",
            "SFT wall clock (s)",
            "eval_loss",
            "held-out loss",
            "freezing on SFT (same language): wall clock, held-out loss",
            "tab:cyan",
        )
        bars_and_dots(
            axes[2],
            "distillation",
            "inference_tokens_per_s",
            "inference tokens/s (1 thread)",
            "eval_ppl",
            "eval perplexity",
            "distillation: speed (bars), eval perplexity (dots)",
            "tab:green",
        )
        ax = axes[3]
        pl = [r for r in rows if r["part"] == "pipeline" and "bubble_measured" in r]
        if pl:
            ax.plot([r["micro_batches"] for r in pl], [r["bubble_measured"] for r in pl], "o-", label="measured")
            ax.plot([r["micro_batches"] for r in pl], [r["bubble_formula"] for r in pl], "x--", label="(p-1)/(m+p-1)")
            ax.set_xlabel("micro-batches m")
            ax.set_ylabel("bubble fraction")
            ax.legend()
            ax.set_title("pipeline bubble")
        else:
            bl = [r for r in rows if r["part"] == "baseline" and "tokens_per_s" in r]
            ax.bar([r["variant"] for r in bl], [r["tokens_per_s"] for r in bl], color="tab:purple")
            ax.set_ylabel("training tokens/s (2 procs, ZeRO-2)")
            ax.set_title("recipe vs HF Trainer")
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    return draw


def main():
    os.chdir(ROOT)
    os.makedirs(WORK, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.time()
    print("1/5 teacher", flush=True)
    rows, targets = bench_teacher()
    teacher_dir = os.path.join(WORK, "teacher", "final")
    print("2/5 freezing", flush=True)
    r, t = bench_freezing(teacher_dir)
    rows, targets = rows + r, targets + t
    print("2b/5 freezing on SFT of the pretrained model", flush=True)
    r, t = sft_freezing(launch, teacher_dir, QUICK)
    rows, targets = rows + r, targets + t
    print("3/5 distillation", flush=True)
    r, t = bench_distillation(teacher_dir)
    rows, targets = rows + r, targets + t
    print("4/5 pipeline", flush=True)
    r, t, pipe_note = bench_pipeline()
    rows, targets = rows + r, targets + t
    print("5/5 recipe vs HF Trainer", flush=True)
    r, t = bench_trainer()
    rows, targets = rows + r, targets + t
    minutes = (time.time() - t0) / 60
    notes = (
        f"{'QUICK SMOKE RUN (BENCH_QUICK=1), not a measurement. ' if QUICK else ''}"
        f"Whole benchmark {minutes:.1f} min on {os.cpu_count()} cores; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end (absolute tokens/s on a small CPU machine are low "
        "and noisy; ratios come from runs made minutes apart in the same conditions; cpu_speedup, the ratio of the "
        "CPU seconds of the whole launched runs, startup and eval included so it understates the loop's ratio, "
        "is the cross-check that the load does not inflate). Teacher: GPT-2 8x128 trained "
        f"{TEACHER_STEPS} steps on 2 processes on the generated language (seed 1234; its eval curve is in the "
        "JSON); fine-tune corpus: another generated "
        f"language (seed 4321), {FT_STEPS} steps; SFT freezing: the teacher fine-tuned on the generated chat set of "
        f"its own language (seed 1234). {pipe_note}"
        + (
            " The teacher run was reused from an earlier bench with the same arguments, code and versions "
            "(benchmarks/throughput_teacher.py teacher_key); its wall clock and curve are that run's."
            if rows[0].get("reused")
            else ""
        )
    )
    doc = write_results(
        "throughput", rows, targets, plot=plot(rows), notes=notes, columns=COLUMNS, command="make bench-throughput"
    )
    for tg in doc["targets"]:
        print(f"  {'MET ' if tg['met'] else 'MISS'} {tg['name']}: {tg['value']} (goal {tg['goal']})")


if __name__ == "__main__":
    main()
