"""The committed benchmark results: every docs/results/<name>.json has the shared shape (machine, versions, rows,
targets of {name, value, goal, met}), its Markdown shows every target with the same verdict, and its plot exists.

Run: .venv/bin/python -m pytest tests/test_results.py -q     (reads files only; the benchmarks are `make bench-*`)
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT
from dsrecipes.results import _fmt

RESULTS = os.path.join(ROOT, "docs", "results")
NAMES = sorted(f[:-5] for f in os.listdir(RESULTS) if f.endswith(".json"))
PINNED = {
    line.split("==")[0].lower(): line.split("==")[1].strip()
    for line in open(os.path.join(ROOT, "constraints.txt"))
    if "==" in line and not line.startswith("#")
}


def test_every_benchmark_has_results():
    assert {"memory", "throughput", "serving"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_results_shape(name):
    with open(os.path.join(RESULTS, f"{name}.json")) as fh:
        res = json.load(fh)
    assert {"machine", "versions", "rows", "targets"} <= set(res), sorted(res)
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["date"]
    for pkg in ("torch", "deepspeed", "accelerate", "transformers"):  # measured with the pinned stack
        assert res["versions"][pkg].split("+")[0] == PINNED[pkg], (pkg, res["versions"][pkg])
    assert res["rows"] and all(isinstance(r, dict) for r in res["rows"])
    assert res["targets"]
    md = open(os.path.join(RESULTS, f"{name}.md")).read()
    for t in res["targets"]:
        assert set(t) == {"name", "value", "goal", "met"} and isinstance(t["met"], bool), t
        assert isinstance(t["value"], (int, float)) and not isinstance(t["value"], bool), t
        row = "| " + " | ".join(_fmt(t[k]) for k in ("name", "value", "goal", "met")) + " |"
        assert row in md, row
    png = os.path.join(RESULTS, f"{name}.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
