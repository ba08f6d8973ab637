"""Every SP cell of docs/compat.md that the rule table allows, trained: sequence_parallel_size 2 on 2 CPU ranks x
ZeRO 0-3 x activation checkpointing (none, hf_full, every_k, layer_selective, selective_ops, deepspeed) x ALST
tiling (none, mlp, loss, mlp+loss), issue 13 "Composition".

One torchrun launch of tests/sp_cells_worker.py (module fixture, ~2-3 min on 2 cores) trains all of them in one
process group through DeepSpeed's engine directly (deepspeed.initialize with the SP mpu, the recipes' own
prepare_model, apply_activation_checkpointing, build_optimizer, SequenceShardedLoader and loss_hook); one test id
per cell (config/compat_sp.cell_id) asserts, against an sp=1 reference of the same weights and batches:

- both optimizer steps' losses within 1e-5 relative (step 2 checks the update of step 1), on the (2, 16) shards;
- the first step's gradients, gathered from DeepSpeed's partitions, within 1e-5 relative per parameter tensor (this
  caught ZeRO 0-2 training on sp x the gradient, dsrecipes.compat.sp_gradient_scale), and every parameter moved;
- ZeRO-3 with reduce_scatter: false (it mixes both reductions) and ZeRO-3 + selective_ops + tiled_loss (its
  backward fails) are refused by the rule table (config/rules_sp.py) before training; the first, trained anyway,
  gets a gradient unlike sp=1's (what the rule guards against);
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


@pytest.mark.parametrize(
    "zero, ckpt, tiling, extra, rule_id",
    [
        (3, "none", "none", {"reduce_scatter": False}, "sp_zero3_reduce_scatter_off"),
        (3, "selective_ops", "loss", {}, "sp_zero3_selective_ops_tiled_loss"),
        (3, "selective_ops", "mlp+loss", {}, "sp_zero3_selective_ops_tiled_loss"),
    ],
)
def test_engine_refusals_are_rules(zero, ckpt, tiling, extra, rule_id):
    """ZeRO-3 with reduce_scatter: false and ZeRO-3 + selective_ops + tiled_loss are refused by the rule table (so by
    `dsrecipes check` and the start-up check, tests/test_rules.py), not at the first step; the cells test skips them."""
    from dsrecipes.config import rules

    s = rules.Settings(device="cpu", zero=zero, checkpointing=ckpt, tiling=tiling, sp=2, world=2, **extra)
    assert [r.id for r in rules.fired(s)] == [rule_id]
    assert not rules.fired(rules.Settings(device="cpu", zero=zero, checkpointing=ckpt, tiling=tiling, sp=1, world=2))
    assert (zero, ckpt, tiling) not in CELLS or extra


@pytest.mark.slow
def test_reduce_scatter_off_trains_the_wrong_gradient(cells):
    """Why sp_zero3_reduce_scatter_off refuses: trained anyway (sp_cells_worker.UNGUARDED), ZeRO-3 without
    reduce_scatter sums the SP ranks' gradients in some buckets and averages them in others (DeepSpeed #5248), so
    the gradient is not sp=1's although the first loss is."""
    r = cells["unguarded:zero3-reduce_scatter_false"]
    assert "error" not in r, r.get("traceback")
    assert abs(r["losses"][0] - r["ref_losses"][0]) <= TOL * abs(r["ref_losses"][0])
    assert r["grad_rel_err_max"] > 0.1, (r["grad_rel_err_worst"], r["grad_rel_err_max"])


def test_every_allowed_cell_is_a_works_row_naming_its_test():
    """compat_sp marks each allowed DeepSpeed cell works, naming a test id of this module or of the recipe tests;
    none is left "allowed, not run", and every DDP cell is refused."""
    rows = compat_sp.sp_rows()
    grid = [r for r in rows if r[0].startswith("sp=2, ") and "processes" not in r[0] and "attn" not in r[0]]
    assert len(grid) == len(compat_sp.STAGES) * len(compat_sp.CHECKPOINTING) * len(compat_sp.TILING)
    kinds = [kind for _, kind, _ in grid]
    assert "allowed" not in kinds and kinds.count("works") == len(CELLS)
    refused_ds = [label for label, kind, _ in grid if kind == "refused" and ", DDP," not in label]
    assert kinds.count("refused") == len(compat_sp.CHECKPOINTING) * len(compat_sp.TILING) + len(refused_ds)
    assert refused_ds == [compat_sp._label(3, "selective_ops", t) for t in ("loss", "mlp+loss")]
    assert all(kind == "refused" for label, kind, _ in grid if ", DDP," in label)
    for _, kind, text in grid:
        if kind == "works" and compat_sp.CELLS_TEST in text:
            assert text.split("[", 1)[1].split("]", 1)[0] in IDS, text
            assert "not accelerate" in text
    assert len(IDS) == len(set(IDS))
