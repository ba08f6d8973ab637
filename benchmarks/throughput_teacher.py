"""bench-throughput's teacher: GPT-2 8x128 (configs/models/gpt2_8x128.json) trained by recipes/train_lm.py on the
generated language, 2 processes, 6000 steps on 20,000 documents, with an eval every 250 steps: its curve, and the last
quarter's eval-loss gain (converged: <= 1%), next to the language's entropy rate, the Bayes optimum on the eval
blocks and the unigram entropy. The freezing, SFT-freezing and distillation parts start from its final/ model.

Run: part of `make bench-throughput` (benchmarks/bench_throughput.py calls bench_teacher()). The run takes ~45 min on
2 cores; a later bench whose teacher_key() is the same (arguments, code, versions) reuses it (BENCH_FRESH_TEACHER=1
retrains).
"""

from __future__ import annotations

import json
import os

from dsrecipes.launching import DS_YAML
from dsrecipes.results import target
from throughput_common import COMMON, QUICK, ROOT, WORK, ZERO2, S, launch, read_json

TEACHER_STEPS = S(6000, 6)
TEACHER_EVAL = S(250, 3)  # the teacher's eval interval: its curve (TEACHER_STEPS / 4 is a multiple of it)
TEACHER = [
    "--model_config",
    "configs/models/gpt2_8x128.json",
    "--generated_docs",
    S("20000", "100"),  # 4.4M bytes: under 3 epochs in 6000 steps (2000 documents were 11 epochs in 2400)
    "--eval_docs",
    S("100", "20"),
    "--learning_rate",
    "0.003",
    "--warmup_steps",
    "40",  # the make train schedule (configs/recipes/train_tiny_zero2.yaml: 20 warm-up steps spiked)
]


def bench_teacher():
    """Train the teacher on 2 processes with an eval every TEACHER_EVAL steps: its curve, and how much the last quarter
    of the run still improved the eval loss (the teacher has converged when that is small), next to the generated
    language's entropy rate (the Bayes-optimal loss) and unigram entropy."""
    args = [
        "--config",
        "configs/recipes/train_tiny_zero2.yaml",
        *COMMON,
        *TEACHER,
        "--max_steps",
        str(TEACHER_STEPS),
        "--eval_steps",
        str(TEACHER_EVAL),
    ]
    key, key_path = teacher_key(args), os.path.join(WORK, "teacher.key.json")
    cached = (
        key is not None
        and read_json(key_path) == key
        and os.path.isfile(os.path.join(WORK, "teacher", "final", "config.json"))
    )
    if cached:
        s = read_json(os.path.join(WORK, "teacher", "summary.json"))
        print(f"  teacher: reused {WORK}/teacher (same arguments, code and versions; BENCH_FRESH_TEACHER=1 retrains)")
    else:
        if os.path.exists(key_path):
            os.remove(key_path)
        s = launch("teacher", "recipes/train_lm.py", args, nproc=2)
        if key is not None:
            with open(key_path, "w") as fh:
                json.dump(key, fh, indent=1)
    with open(os.path.join(WORK, "teacher", "metrics.jsonl")) as fh:
        curve = [(r["step"], r["eval_loss"]) for r in map(json.loads, fh) if "eval_loss" in r]
    last = [v for step, v in curve if step >= 0.75 * TEACHER_STEPS]
    late_gain = 100 * (last[0] - last[-1]) / last[0] if len(last) > 1 else None
    row = {
        "part": "teacher",
        "variant": "GPT-2 8x128, 2 procs",
        "train_steps": TEACHER_STEPS,
        "wall_clock_s": round(s["train_time_s"], 1),
        "eval_loss": round(s["final_eval_loss"], 4),
        "eval_curve": [[step, round(v, 4)] for step, v in curve],
        "last_quarter_gain_pct": None if late_gain is None else round(late_gain, 2),
        "entropy_rate": s.get("entropy_rate"),
        "block_optimum": round(eval_block_optimum(), 4),
        "unigram_entropy": s.get("unigram_entropy"),
        "params": s["params"],
        "reused": cached,  # the teacher run of an earlier bench with the same key (teacher_key): its wall clock
    }
    converged = late_gain is not None and late_gain <= 1.0
    return [row], [
        target(
            "teacher: eval-loss improvement over the last quarter of its training (converged: <= 1%; eval loss "
            f"{row['eval_loss']} nats/byte, {row['eval_loss'] / row['block_optimum']:.2f}x the optimum on these "
            f"eval blocks, {row['block_optimum']:.3f}; entropy rate {row['entropy_rate']:.3f}, unigram entropy "
            f"{row['unigram_entropy']:.3f})",
            row["last_quarter_gain_pct"],
            "<= 1% (the distillation rows need a converged teacher)",
            converged,
        )
    ]


def teacher_key(args: list[str]) -> dict | None:
    """What the teacher run depends on: its arguments, the bytes of the recipe, its YAML, model, DeepSpeed and
    accelerate configs and every module of src/dsrecipes (the run imports the loop, configs, memory, freezing and
    parallel code), and the versions. A later bench whose key is equal reuses the run (45 min on 2 cores) instead of
    training it again; BENCH_FRESH_TEACHER=1 or BENCH_QUICK=1 always retrains."""
    import glob
    import hashlib

    from dsrecipes.results import versions

    if QUICK or os.environ.get("BENCH_FRESH_TEACHER") == "1":
        return None
    configs = [args[args.index(flag) + 1] for flag in ("--config", "--model_config")]
    library = glob.glob(os.path.join(ROOT, "src", "dsrecipes", "**", "*.py"), recursive=True)
    files = ["recipes/train_lm.py", *configs, ZERO2, DS_YAML, *sorted(os.path.relpath(f, ROOT) for f in library)]
    digest = {}
    for f in files:
        with open(os.path.join(ROOT, f), "rb") as fh:
            digest[f] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"args": args, "files": digest, "versions": versions()}


def eval_block_optimum() -> float:
    """The Bayes-optimal loss on the teacher's eval blocks (its 100 eval documents of the default generated_seed 1234,
    in 128-token blocks; dsrecipes.train.corpus.Language.block_loss): what its eval loss can reach. The distillation
    rows share the eval set."""
    from dsrecipes.train.corpus import Language, generated_split

    docs = int(TEACHER[TEACHER.index("--eval_docs") + 1])
    evl = generated_split(0, docs, 1234)[1]
    return Language(1234).block_loss(evl, int(COMMON[COMMON.index("--block_size") + 1]))
