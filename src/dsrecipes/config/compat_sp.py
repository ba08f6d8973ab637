"""The composition table's sequence-parallel section: SP x ZeRO stage x activation checkpointing x ALST tiling.

    for label, kind, text in sp_rows(): ...   # kind: works | refused | gpu | allowed

Each cell is the rule table's answer (config/rules.py with config/rules_sp.py) for sequence_parallel_size 2 on 2
CPU processes, or the test that ran exactly that cell, or "GPU only" for what a CPU run cannot show:
tests/test_sequence_parallel.py runs a few cells as the recipe through `accelerate launch` (the sp=1 loss curve);
tests/test_sequence_parallel_cells.py runs every cell the rule table allows (engine_cells) in one 2-rank torchrun
process group, through DeepSpeed's engine directly (deepspeed.initialize with the SP mpu, not accelerate): 2 AdamW
steps each, both losses and the first step's gradients equal to sp=1's in fp32. config/compat_doc.py renders it like
its LoRA section.
"""

from __future__ import annotations

SP_TEST = "tests/test_sequence_parallel.py"
STAGES = (None, 0, 1, 2, 3)  # None: plain DDP (no DeepSpeed)
CHECKPOINTING = ("none", "hf_full", "every_k", "layer_selective", "selective_ops", "deepspeed")
TILING = ("none", "mlp", "loss", "mlp+loss")
# (zero, checkpointing, tiling) -> the test that trained exactly this cell with sp=2 and matched sp=1
TESTED = {
    (0, "none", "mlp+loss"): "test_sp2_cells_match_sp1[zero0_bf16]",
    (2, "hf_full", "mlp+loss"): "test_recipe_sp2_matches_sp1",
    (3, "deepspeed", "loss"): "test_sp2_cells_match_sp1[zero3_deepspeed_loss]",
    (1, "layer_selective", "mlp"): "test_sp2_cells_match_sp1[zero1_layer_selective_mlp]",
}
# Every other allowed DeepSpeed cell: one test parametrized over engine_cells(), ids zero{stage}-{ckpt}-{tiling}
CELLS_TEST = "tests/test_sequence_parallel_cells.py"
CELLS_TEST_FN = "test_sp2_cell_matches_sp1"
# Beyond one SP group: sp=2 on 4 processes (2 groups, data parallel between them), ZeRO-2, full checkpointing, tiling
DATA_PARALLEL_TEST = "test_sp2_with_data_parallel"
# What CPU runs cannot show, per setting: (axis, value) -> why the cell is GPU only beyond the tested ones
GPU_ONLY = {
    ("attn", "flash_attention_2"): "flash-attention kernels (sp_attn_implementation) need a CUDA GPU",
}


def _label(zero, ckpt: str, tiling: str) -> str:
    stage = "DDP" if zero is None else f"ZeRO-{zero}"
    return f"sp=2, {stage}, checkpointing {ckpt}, tiling {tiling}"


def cell_id(zero: int, ckpt: str, tiling: str) -> str:
    return f"zero{zero}-{ckpt}-{tiling}"


def engine_cells(sp: int = 2, world: int = 2) -> list[tuple[int, str, str]]:
    """Every DeepSpeed cell (ZeRO 0-3 x checkpointing x tiling) that the rule table does not refuse: what
    tests/sp_cells_worker.py trains and tests/test_sequence_parallel_cells.py checks, one test id per cell."""
    from dsrecipes.config import rules

    out = []
    for zero in STAGES[1:]:
        for ckpt in CHECKPOINTING:
            for tiling in TILING:
                s = rules.Settings(device="cpu", zero=zero, checkpointing=ckpt, tiling=tiling, sp=sp, world=world)
                if not rules.fired(s, refused=True):
                    out.append((zero, ckpt, tiling))
    return out


def sp_rows(sp: int = 2, world: int = 2) -> list[tuple[str, str, str]]:
    """(label, kind, text) per SP cell: refused (the rule ids), works (the test that ran it: the recipe's, else the
    cells test's id) or allowed (no rule refuses it and no test runs it)."""
    from dsrecipes.config import rules

    engine = set(engine_cells(sp, world)) if (sp, world) == (2, 2) else set()  # the cells test runs sp=2, 2 ranks
    out = []
    for zero in STAGES:
        for ckpt in CHECKPOINTING:
            for tiling in TILING:
                s = rules.Settings(device="cpu", zero=zero, checkpointing=ckpt, tiling=tiling, sp=sp, world=world)
                refused = rules.fired(s, refused=True)
                label = _label(zero, ckpt, tiling)
                if refused:
                    out.append((label, "refused", "; ".join(f"{r.text(s)} [{r.id}]" for r in refused)))
                elif (zero, ckpt, tiling) in TESTED:
                    out.append((label, "works", f"`{SP_TEST}::{TESTED[zero, ckpt, tiling]}`"))
                elif (zero, ckpt, tiling) in engine:
                    test = f"{CELLS_TEST}::{CELLS_TEST_FN}[{cell_id(zero, ckpt, tiling)}]"
                    out.append((label, "works", f"`{test}` (through DeepSpeed's engine directly, not accelerate)"))
                else:
                    out.append((label, "allowed", "no rule refuses it; no test runs this cell with SP yet"))
    s = rules.Settings(device="cpu", zero=2, checkpointing="hf_full", tiling="mlp+loss", sp=sp, world=2 * sp)
    label = (
        f"sp={sp} on {2 * sp} processes (2 SP groups, data parallel), ZeRO-2, checkpointing hf_full, tiling mlp+loss"
    )
    refused = rules.fired(s, refused=True)
    out.append(
        (label, "refused", "; ".join(r.id for r in refused))
        if refused
        else (label, "works", f"`{SP_TEST}::{DATA_PARALLEL_TEST}`")
    )
    # a DeepSpeed JSON key, not a grid axis: ZeRO-3 with reduce_scatter false, refused whatever the cell
    s = rules.Settings(device="cpu", zero=3, reduce_scatter=False, sp=sp, world=world)
    label = f"sp={sp} with ZeRO-3 and zero_optimization.reduce_scatter false (any checkpointing, tiling)"
    refused = rules.fired(s, refused=True)
    out.append((label, "refused" if refused else "allowed", "; ".join(f"{r.text(s)} [{r.id}]" for r in refused)))
    for (axis, value), why in GPU_ONLY.items():
        out.append((f"sp=2, {axis} {value}", "gpu", why))
    return out


def sp_md() -> list[str]:
    """The section's markdown (the lead wires it into docs/compat.md through compat_doc.py): one grid row per ZeRO
    stage x checkpointing mode, one column per tiling; each refusal's text once, below the grid."""
    cells = {label: (kind, text) for label, kind, text in sp_rows()}
    lines = ["", "## Sequence parallelism (sequence_parallel_size 2, 2 processes) and ALST tiling", ""]
    lines += ["| ZeRO, checkpointing | " + " | ".join(f"tiling {t}" for t in TILING) + " |"]
    lines += ["|---|" + "---|" * len(TILING)]
    reasons: dict[str, str] = {}
    for zero in STAGES:
        for ckpt in CHECKPOINTING:
            marks = []
            for tiling in TILING:
                kind, text = cells[_label(zero, ckpt, tiling)]
                if kind == "refused":
                    ids = [part.rsplit("[", 1)[1].rstrip("]") for part in text.split("; ") if "[" in part]
                    reasons.update({i: part for i, part in zip(ids, text.split("; "))})
                    marks.append("refused: " + ", ".join(ids))
                elif text.startswith(f"`{CELLS_TEST}::"):
                    marks.append(f"**works** (cells test `{cell_id(zero, ckpt, tiling)}`)")
                else:
                    marks.append({"works": f"**works** ({text})", "allowed": "allowed, not run"}[kind])
            stage = "DDP" if zero is None else f"ZeRO-{zero}"
            lines.append(f"| {stage}, {ckpt} | " + " | ".join(marks) + " |")
    lines += [""] + [f"- `{i}`: {reasons[i].replace('|', '/')}" for i in sorted(reasons)]
    lines += [
        f"- cells test `ID`: `{CELLS_TEST}::{CELLS_TEST_FN}[ID]`, one 2-rank torchrun process group "
        "(tests/sp_cells_worker.py) running every allowed DeepSpeed cell through DeepSpeed's engine directly, not "
        "accelerate: deepspeed.initialize with the shipped zero{0,1,2,3}.json and DeepSpeed's SP mpu, the recipes' "
        "prepare_model, apply_activation_checkpointing and loss_hook; 2 AdamW steps on the tiny Llama, both losses "
        "and the first step's gradients equal to sp=1's (fp32, 1e-5 relative), every parameter updated"
    ]
    lines += [f"- GPU only: {label}: {text}" for label, kind, text in sp_rows() if kind == "gpu"]
    lines += [f"- {label}: **{kind}** {text}" for label, kind, text in sp_rows() if "data parallel" in label]
    lines += [f"- {label}: **{kind}**: {text}" for label, kind, text in sp_rows() if "reduce_scatter" in label]
    return lines
