"""`dsrecipes compat`: docs/compat.md, the matrix of which techniques combine, generated from the rule table
(rules.py) and the all-pairs covering runs of tests/test_compat.py.

    dsrecipes compat            # write docs/compat.md
    dsrecipes compat --check    # exit 2 if docs/compat.md is not what the generator writes

Axes: ZeRO x activation checkpointing x optimizer x precision x freezing x recipe (AXES). A combination is
refused when a rule of the table fires for it. `design()` picks few allowed combinations that together contain
every allowed pair of axis values (greedy all-pairs covering, seeded and deterministic); tests/test_compat.py
launches each of them (2 CPU processes). Each pair cell of the matrix is then **works** (the test that ran it),
**refused** (the rule's one-line reason, when every combination containing the pair is refused) or **GPU only**.
"""

from __future__ import annotations

import itertools
import os
import random
import sys

from dsrecipes.config import rules

# axis -> {label: settings fields}; labels are what test ids and the doc show
AXES: dict[str, dict[str, dict]] = {
    "zero": {
        "z0": {"zero": 0},
        "z1": {"zero": 1},
        "z2": {"zero": 2},
        "z3": {"zero": 3},
        "z2off": {"zero": 2, "offload": "cpu"},
        "z3off": {"zero": 3, "offload": "cpu", "offload_param": "cpu"},
    },
    "checkpointing": {
        "none": {"checkpointing": "none"},
        "full_reentrant": {"checkpointing": "hf_full_reentrant"},
        "full": {"checkpointing": "hf_full"},
        "every_k": {"checkpointing": "every_k"},
        "deepspeed": {"checkpointing": "deepspeed"},
    },
    "optimizer": {
        "adamw": {"optimizer": "adamw"},
        "bnb8": {"optimizer": "adamw_8bit"},
        "torchao8": {"optimizer": "torchao_adamw_8bit"},
    },
    "precision": {"bf16": {"precision": "bf16"}},
    "freezing": {
        "static": {"freeze": "static"},
        "progressive_cache": {"freeze": "progressive", "cache": "memory"},
    },
    "recipe": {
        "train_lm": {"recipe": "train_lm"},
        "distill": {"recipe": "distill"},
        "pipeline": {"recipe": "pipeline"},
    },
}
TITLES = {
    "zero": "ZeRO",
    "checkpointing": "activation checkpointing",
    "optimizer": "optimizer",
    "precision": "precision",
    "freezing": "freezing",
    "recipe": "recipe",
}
LABELS = {
    "z0": "ZeRO-0",
    "z1": "ZeRO-1",
    "z2": "ZeRO-2",
    "z3": "ZeRO-3",
    "z2off": "ZeRO-2 offload",
    "z3off": "ZeRO-3 offload",
    "none": "none",
    "full_reentrant": "HF full (reentrant)",
    "full": "HF non-reentrant",
    "every_k": "every_k",
    "deepspeed": "DeepSpeed",
    "adamw": "AdamW",
    "bnb8": "bnb 8-bit",
    "torchao8": "torchao 8-bit",
    "bf16": "bf16",
    "static": "static freeze",
    "progressive_cache": "progressive freeze + cache",
    "train_lm": "train_lm",
    "distill": "distillation student",
    "pipeline": "pipeline",
}
# Combinations that run only on a GPU: (predicate on the labels, reason). None known today: every allowed
# combination of these axes runs on the CPU accelerator (bf16 included).
GPU_ONLY: list[tuple] = []
# The greedy's tie-break seed: with it the design has 30 runs, the fewest possible here (torchao runs only under
# ZeRO-0, so ZeRO-0 needs its 5 checkpointing modes with torchao plus one run each with AdamW and bnb: 7; then
# ZeRO-1, ZeRO-2, ZeRO-2 offload 5 each, ZeRO-3 and ZeRO-3 offload 4 each, reentrant being refused) and, among the
# seeds below 300 that reach 30, the fewest distillation and offload launches (the slow ones).
SEED = 189
TEST_FILE = "tests/test_compat.py"
TEST_NAME = "test_combination"
DOC = "docs/compat.md"


def combo_settings(combo: dict) -> rules.Settings:
    fields = {"device": "cpu"}
    for axis, label in combo.items():
        fields.update(AXES[axis][label])
    return rules.Settings(**fields)


def all_combos() -> list[dict]:
    names = list(AXES)
    return [dict(zip(names, labels)) for labels in itertools.product(*(AXES[a] for a in names))]


def refused_by(combo: dict) -> list[rules.Rule]:
    return rules.fired(combo_settings(combo), refused=True)


def gpu_only(combo: dict) -> str | None:
    return next((reason for pred, reason in GPU_ONLY if pred(combo)), None)


def pairs_of(combo: dict) -> set:
    items = sorted(combo.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def run_id(combo: dict) -> str:
    return "-".join(combo[a] for a in AXES)


def design(seed: int = SEED) -> list[dict]:
    """Greedy all-pairs covering over the combinations that no rule refuses and that run on CPU."""
    allowed = [c for c in all_combos() if not refused_by(c) and not gpu_only(c)]
    random.Random(seed).shuffle(allowed)  # the tie-break among equally good candidates: seeded, deterministic
    uncovered = set().union(*(pairs_of(c) for c in allowed))
    runs = []
    while uncovered:
        best = max(allowed, key=lambda c: len(pairs_of(c) & uncovered))
        runs.append(best)
        uncovered -= pairs_of(best)
    return sorted(runs, key=run_id)


def test_id(combo: dict) -> str:
    return f"{TEST_FILE}::{TEST_NAME}[{run_id(combo)}]"


# ----------------------------------------------------------------------------- the cells
def cell(axis_a: str, a: str, axis_b: str, b: str, runs: list[dict]) -> tuple[str, str]:
    """(kind, text) for the pair axis_a=a, axis_b=b: works | refused | gpu."""
    ran = [r for r in runs if r[axis_a] == a and r[axis_b] == b]
    completions = [c for c in all_combos() if c[axis_a] == a and c[axis_b] == b]
    if ran:  # a note shows where it holds for every allowed combination with this pair
        allowed = [combo_settings(c) for c in completions if not refused_by(c)]
        notes = [r for r in rules.RULES if not r.refused and all(r.matches(s) for s in allowed)]
        text = f"`{run_id(ran[0])}`" + "".join(f"; {r.text(allowed[0])} [{r.id}]" for r in notes)
        return "works", text
    fired = [refused_by(c) for c in completions]
    if all(fired):
        common = [r for r in fired[0] if all(r in f for f in fired)]
        if common:
            return "refused", "; ".join(f"{r.text(combo_settings(completions[0]))} [{r.id}]" for r in common)
        ids = sorted({r.id for f in fired for r in f})
        return "refused", "every combination with it is refused: " + ", ".join(f"[{i}]" for i in ids)
    reasons = {gpu_only(c) for c in completions if not refused_by(c)}
    if None not in reasons:
        return "gpu", "; ".join(sorted(reasons))
    raise AssertionError(f"pair {axis_a}={a}, {axis_b}={b} is allowed but no run covers it")


def _cell_md(kind: str, text: str) -> str:
    return {"works": "**works** ", "refused": "**refused**: ", "gpu": "**GPU only**: "}[kind] + text.replace("|", "/")


def matrix(runs: list[dict] | None = None) -> dict:
    """{(axis_a, axis_b): {(a, b): (kind, text)}} for every pair of axes."""
    runs = design() if runs is None else runs
    out = {}
    for axis_a, axis_b in itertools.combinations(AXES, 2):
        out[(axis_a, axis_b)] = {(a, b): cell(axis_a, a, axis_b, b, runs) for a in AXES[axis_a] for b in AXES[axis_b]}
    return out


def render(runs: list[dict] | None = None) -> str:
    runs = design() if runs is None else runs
    lines = [
        "# Which techniques combine",
        "",
        "GENERATED by `dsrecipes compat` (src/dsrecipes/config/compat_doc.py) from the rule table in",
        "src/dsrecipes/config/rules.py and the runs of tests/test_compat.py; do not edit by hand (`make compat`).",
        "",
        "Every cell is a pair of settings. **works**: the named run of `tests/test_compat.py::test_combination`",
        "switched both on (with the other techniques of that run; 2 CPU processes, `accelerate launch`) and",
        "trained to completion with a falling loss; **refused**: the rule of the table that refuses it, with the",
        "one-line reason `dsrecipes check` and the recipes print; **GPU only**: cannot run on the CPU accelerator.",
        "A run id reads " + " - ".join(TITLES[a] for a in AXES) + ".",
        "",
        f"{len(runs)} runs cover all {sum(len(pairs_of(r)) for r in runs)} pair slots "
        f"({len(set().union(*(pairs_of(r) for r in runs)))} distinct allowed pairs) of "
        f"{len(all_combos())} combinations.",
        "",
        "## The runs",
        "",
        "| test id | " + " | ".join(TITLES[a] for a in AXES) + " |",
        "|---|" + "---|" * len(AXES),
    ]
    for r in runs:
        lines.append(f"| `{run_id(r)}` | " + " | ".join(LABELS[r[a]] for a in AXES) + " |")
    for (axis_a, axis_b), cells in matrix(runs).items():
        lines += ["", f"## {TITLES[axis_a]} x {TITLES[axis_b]}", ""]
        lines.append(f"| {TITLES[axis_a]} \\ {TITLES[axis_b]} | " + " | ".join(LABELS[b] for b in AXES[axis_b]) + " |")
        lines.append("|---|" + "---|" * len(AXES[axis_b]))
        for a in AXES[axis_a]:
            row = [_cell_md(*cells[(a, b)]) for b in AXES[axis_b]]
            lines.append(f"| {LABELS[a]} | " + " | ".join(row) + " |")
    lines += _lora_md()
    from dsrecipes.config import compat_sp, compat_tp  # they read this module's rule helpers

    lines += compat_sp.sp_md() + compat_tp.tp_md()
    lines += ["", "## The rules", "", "| rule | concerns | refused | reason; fix | upstream |", "|---|---|---|---|---|"]
    for r in rules.RULES:
        concerns = "; ".join(f"{k} {_values(v)}" for k, v in r.concerns.items())
        refused = "yes" if r.refused else "no (note)"
        lines.append(f"| `{r.id}` | {concerns} | {refused} | {r.problem}; {r.fix} | {r.issue or '-'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the LoRA rows
LORA_TEST = "tests/test_lora.py"
_DDP, _Z0, _Z2, _Z3, _QLORA = (
    "test_ddp_lora_exports_merged_and_adapter_and_the_server_loads_it",
    "test_zero0_state_bytes_scale_with_the_adapter_not_the_model",
    "test_zero2_lora_preempted_and_resumed_equals_the_straight_run",
    "test_zero3_init_lora_reentrant_8bit_exports_gathered_weights",
    "test_qlora_nf4_one_process_resumes_exactly_and_exports_dequantized_merge",
)
# (row label, the settings besides LoRA, the test of tests/test_lora.py that runs LoRA with it, or None)
LORA_ROWS: list[tuple[str, dict, str | None]] = [
    ("plain DDP", {"zero": None}, _DDP),
    ("ZeRO-0", {"zero": 0}, _Z0),
    ("ZeRO-1", {"zero": 1}, None),
    ("ZeRO-2", {"zero": 2}, _Z2),
    ("ZeRO-3 (zero3_init_flag: true)", {"zero": 3}, _Z3),
    ("ZeRO-2 offload", {"zero": 2, "offload": "cpu"}, None),
    ("ZeRO-3 offload", {"zero": 3, "offload": "cpu", "offload_param": "cpu"}, None),
    ("HF full (reentrant), ZeRO-3", {"zero": 3, "checkpointing": "hf_full_reentrant"}, _Z3),
    ("HF non-reentrant, ZeRO-2", {"zero": 2, "checkpointing": "hf_full"}, _Z2),
    ("every_k, DDP", {"zero": None, "checkpointing": "every_k"}, _DDP),
    ("DeepSpeed checkpointing", {"zero": 2, "checkpointing": "deepspeed"}, None),
    ("bnb 8-bit, ZeRO-3", {"zero": 3, "optimizer": "adamw_8bit"}, _Z3),
    ("torchao 8-bit, ZeRO-0", {"zero": 0, "optimizer": "torchao_adamw_8bit"}, None),
    ("static freeze", {"zero": 2, "freeze": "static"}, None),
    ("progressive freeze + cache", {"zero": 2, "freeze": "progressive", "cache": "memory"}, None),
    ("distillation student", {"zero": 2, "recipe": "distill"}, None),
    ("pipeline", {"zero": 1, "recipe": "pipeline"}, None),  # neither recipe has LoraArguments (config/args.py)
    (
        "QLoRA (NF4), one process",
        {"zero": None, "lora": "qlora"},
        "test_qlora_nf4_one_process_resumes_exactly_and_exports_dequantized_merge",
    ),
    ("QLoRA (NF4), ZeRO-2", {"zero": 2, "lora": "qlora"}, None),
    ("QLoRA (NF4), ZeRO-3", {"zero": 3, "lora": "qlora"}, None),
]


def lora_rows() -> list[tuple[str, str, str]]:
    """(label, kind, text) per LoRA row: refused (the rule), works (the test that ran it) or allowed (not run)."""
    out = []
    for label, fields, test in LORA_ROWS:
        s = rules.Settings(**{"device": "cpu", "lora": "lora", **fields})
        refused = rules.fired(s, refused=True)
        if s.recipe in ("distill", "pipeline"):
            script = "distill.py" if s.recipe == "distill" else "train_pipeline.py"
            out.append((label, "refused", f"recipes/{script} takes no lora_* keys: lora_r is an unknown key there"))
        elif refused:
            out.append((label, "refused", "; ".join(f"{r.text(s)} [{r.id}]" for r in refused)))
        elif test:
            out.append((label, "works", f"`{LORA_TEST}::{test}`"))
        else:
            out.append((label, "allowed", "no rule refuses it; no test runs it with LoRA yet"))
    return out


MARKS = {
    "works": "**works** ",
    "refused": "**refused**: ",
    "gpu": "**GPU only**: ",
    "allowed": "**allowed, not run**: ",
}


def rows_md(title: str, head: str, rows: list[tuple[str, str, str]]) -> list[str]:
    """A two-column section of docs/compat.md: one (label, kind, text) row per line (the LoRA and AutoTP sections)."""
    lines = ["", f"## {title}", "", f"| {head} | |", "|---|---|"]
    return lines + [f"| {label} | {MARKS[kind]}{text.replace('|', '/')} |" for label, kind, text in rows]


def _lora_md() -> list[str]:
    return rows_md("LoRA (lora_r > 0)", "LoRA with", lora_rows())


def _values(v) -> str:
    if isinstance(v, rules.Not):
        return "not in " + ", ".join(str(x) or '""' for x in sorted(v, key=str))
    return "in " + ", ".join(str(x) for x in sorted(v, key=str))


def add_arguments(parser) -> None:
    parser.add_argument("--check", action="store_true", help=f"exit 2 if {DOC} is out of date instead of writing it")
    parser.add_argument("--output", default=DOC, help=f"where to write (default {DOC})")


def run(ns) -> int:
    text = render()
    if ns.check:
        current = open(ns.output).read() if os.path.isfile(ns.output) else ""
        if current != text:
            print(f"error: {ns.output}: -: out of date with the rule table; run `dsrecipes compat`", file=sys.stderr)
            return 2
        print(f"ok: {ns.output} is up to date")
        return 0
    os.makedirs(os.path.dirname(ns.output) or ".", exist_ok=True)
    with open(ns.output, "w") as fh:
        fh.write(text)
    print(f"wrote {ns.output}")
    return 0
