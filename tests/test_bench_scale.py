"""benchmarks/bench_scale.py's search for the longest sequence under a per-rank activation budget, on one real
process (tiny Llama, CPU): the length it returns fits the budget and one step more does not, and the planner agrees
with the measured bytes at that length.

Run: .venv/bin/python -m pytest tests/test_bench_scale.py -q        (one child process, ~20-40 s)
"""

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
def test_search_finds_the_longest_sequence_under_the_budget():
    import bench_scale

    budget = 6 * bench_scale.MiB
    got = bench_scale.spawn(1, [("search", "ckpt", "full", False, budget)], "test_bench_scale")["ckpt"]
    points = {p["seq"]: p for p in got["points"]}
    best = got["max_seq"]
    assert best % bench_scale.STEP == 0 and best > 512  # full checkpointing at 6 MiB: over 1K tokens
    assert points[best]["total"] <= budget < points[best + bench_scale.STEP]["total"]
    assert points[best]["total"] == points[best]["saved"] + points[best]["logits"] and points[best]["logits"] > 0
    totals = [points[s]["total"] for s in sorted(points)]
    assert totals == sorted(totals)  # bytes grow with the length
    plan = bench_scale.plan(best, 1, "full", False)
    predicted = plan["detail"]["activations_saved_forward"] + 4 * best * bench_scale.VOCAB
    assert predicted == pytest.approx(points[best]["total"], rel=0.05)
