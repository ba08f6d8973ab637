"""Every SP cell of docs/compat.md that the rule table allows, trained: sequence_parallel_size 2 on 2 CPU ranks x
ZeRO 0-3 x activation checkpointing (none, hf_full, every_k, layer_selective, selective_ops, deepspeed) x ALST
tiling (none, mlp, loss, mlp+loss), issue 13 "Composition".

One torchrun launch of tests/sp_cells_worker.py (module fixture, ~2-3 min on 2 cores) trains all of them in one
process group through DeepSpeed's engine directly (deepspeed.initialize with the SP mpu, the recipes' own
prepare_model, apply_activation_checkpointing, build_optimizer, SequenceShardedLoader and loss_hook); one test id
per cell (config/compat_sp.cell_id) asserts, against an sp=1 reference of the same weights and batches:

- both optimizer steps' losses within 1e-5 relative (step 2 checks the update of step 1), on the (2, 16) shards;
- the first step's gradients, gathered from DeepSpeed's partitions, within 1e-5 relative per parameter tensor (this
  caught ZeRO 0-2 training on sp x the gradient, parallel/sequence._sums_sp_gradients), and every parameter moved;
- ZeRO-3 with reduce_scatter: false (it mixes both reductions) and ZeRO-3 + selective_ops + tiled_loss (its
  backward fails) are refused in one line (compat_sp.RUNTIME_REFUSED);
- the cell's checkpointing recomputed what it says (attention calls per block in step 1: 2 where a block is
  checkpointed, 1 where not), and its tiling tiled (more down_proj / head calls than the same cell untiled).

Run: .venv/bin/python -m pytest tests/test_sequence_parallel_cells.py -q   (-m slow: the launch; the rest is fast)
"""

from __future__ import annotations

import json
import os

import pytest

from dsrecipes.config import compat_sp
from sp_cells_worker import BATCH, ROOT, SEQ, STEPS

CELLS = compat_sp.engine_cells()
IDS = [compat_sp.cell_id(*c) for c in CELLS]
TOL = 1e-5


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """cell id -> the worker's row, and the sp=1 reference row; all cells in one 2-rank launch."""
    from conftest import run, torchrun_cmd

    out = tmp_path_factory.mktemp("sp_cells") / "rows.json"
    run(torchrun_cmd(2) + [os.path.join(ROOT, "tests", "sp_cells_worker.py"), str(out)], timeout=900)
    rows = {r["cell"]: r for r in json.loads(out.read_text())}
    print("sp cells: %d in %.0f s" % (len(rows) - 1, sum(r.get("seconds", 0) for r in rows.values())))
    return rows


def _expected_attn_calls(row) -> list[int]:
    """Per block, forward calls of its attention in step 1: recomputed (2) where the mode checkpoints the block."""
    info, n = row["checkpointing_info"], len([k for k in row["calls"] if k.startswith("attn")])
    if row["checkpointing"] == "none":
        return [1] * n
    if row["checkpointing"] == "layer_selective":
        return [2 if i in info["blocks"] else 1 for i in range(n)]
    return [2] * n


@pytest.mark.slow
@pytest.mark.parametrize("cell", IDS)
def test_sp2_cell_matches_sp1(cells, cell):
    """sp=2 through DeepSpeed's engine at this ZeRO stage, checkpointing and tiling == sp=1 (losses, gradients)."""
    r = cells[cell]
    assert "error" not in r, r.get("traceback")
    assert r["zero_stage"] == r["zero"] and r["sp_size"] == 2
    assert r["shard_shapes"] == [[BATCH, SEQ // 2]] * STEPS  # each rank held half of every sequence
    assert len(r["losses"]) == len(r["ref_losses"]) == STEPS
    for step, (got, want) in enumerate(zip(r["losses"], r["ref_losses"]), 1):
        assert abs(got - want) <= TOL * abs(want), (cell, step, got, want)
    assert r["grad_rel_err_max"] <= TOL, (cell, r["grad_rel_err_worst"], r["grad_rel_err_max"])
    assert r["params"] > 0 and r["unmoved"] == [], (cell, r["unmoved"])  # weight decay 0: moved = got a gradient
    attn = [r["calls"][f"attn{i}"] for i in range(len(_expected_attn_calls(r)))]
    assert attn == _expected_attn_calls(r), (cell, attn, r["checkpointing_info"])
    sp = r["sequence_parallel"]
    assert sp["sp_size"] == 2 and (sp["tiled_mlp"], sp["tiled_loss"]) == ("mlp" in r["tiling"], "loss" in r["tiling"])
    untiled = cells[compat_sp.cell_id(r["zero"], r["checkpointing"], "none")]["calls"]
    for key, on in (("mlp0_down", sp["tiled_mlp"]), ("head", sp["tiled_loss"])):
        assert (r["calls"][key] > untiled[key]) == on, (cell, key, r["calls"][key], untiled[key])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, key, problem",
    [
        ("zero3-reduce_scatter_false", "<deepspeed>: zero_optimization.reduce_scatter", "false with sequence_parallel"),
        ("zero3-selective_ops-loss", "<args>: gradient_checkpointing", "selective_ops with ZeRO-3, tiled_loss"),
    ],
)
def test_refused_cell_is_one_line(cells, name, key, problem):
    """ZeRO-3 with reduce_scatter: false (sums some buckets' SP gradients, averages others: DeepSpeed #5248) and
    ZeRO-3 + selective_ops + tiled_loss (its recompute's all-gathers differ from the forward's: without the refusal
    a RuntimeError in backward) are refused by the first sequence_loss, on both ranks alike (ConfigError)."""
    line = cells["refused:" + name].get("error_line", "")
    assert line.startswith(f"error: {key}: {problem}"), line
    assert "\n" not in line


def test_every_allowed_cell_is_a_works_row_naming_its_test():
    """compat_sp marks each allowed DeepSpeed cell works, naming a test id of this module or of the recipe tests;
    none is left "allowed, not run", and every DDP cell is refused."""
    rows = compat_sp.sp_rows()
    grid = [r for r in rows if r[0].startswith("sp=2, ") and "processes" not in r[0] and "attn" not in r[0]]
    assert len(grid) == len(compat_sp.STAGES) * len(compat_sp.CHECKPOINTING) * len(compat_sp.TILING)
    kinds = [kind for _, kind, _ in grid]
    assert "allowed" not in kinds and kinds.count("works") == len(CELLS)
    assert kinds.count("refused") == len(compat_sp.STAGES[:1]) * len(compat_sp.CHECKPOINTING) * len(
        compat_sp.TILING
    ) + len(compat_sp.RUNTIME_REFUSED)
    assert all(kind == "refused" for label, kind, _ in grid if ", DDP," in label)
    for _, kind, text in grid:
        if kind == "works" and compat_sp.CELLS_TEST in text:
            assert text.split("[", 1)[1].split("]", 1)[0] in IDS, text
            assert "not accelerate" in text
    assert len(IDS) == len(set(IDS))
