"""Which techniques combine (docs/compat.md): the all-pairs covering runs, and the check that the rule table, the
matrix and the doc agree.

- test_combination[<zero>-<checkpointing>-<optimizer>-<precision>-<freezing>-<recipe>] (slow): one 2-process
  `accelerate launch` per run of dsrecipes.config.compat_doc.design(), several techniques switched on at once; it
  must finish, the loss must fall, and summary.json must report the techniques that were on.
- the fast tests: every refused cell names a rule, every rule that refuses a matrix combination shows in a cell,
  no run is refused, every "works" cell names a run of test_combination, and docs/compat.md is up to date.

Run: .venv/bin/python -m pytest tests/test_compat.py -q            (fast tests)
     .venv/bin/python -m pytest tests/test_compat.py -q -m slow    (the 30 runs: 12.6 minutes in all, 14-69 s each,
     measured on 2 cores shared with other jobs; 14-16 s each once they were quiet, so about 8 minutes on quiet cores)
"""

import json
import os
import re

import pytest

from conftest import ROOT, launch_cmd, read_jsonl, run, summary
from dsrecipes.config import compat_doc, rules

RUNS = compat_doc.design()
IDS = [compat_doc.run_id(c) for c in RUNS]
STEPS = 8
DS_BASE = {
    "z0": "zero0.json",
    "z1": "zero1.json",
    "z2": "zero2.json",
    "z3": "zero3.json",
    "z2off": "zero2_offload.json",
    "z3off": "zero3_offload.json",
}
CKPT_FLAGS = {
    "none": [],
    "full_reentrant": ["--gradient_checkpointing", "full", "--gradient_checkpointing_reentrant", "true"],
    "full": ["--gradient_checkpointing", "full"],
    "every_k": ["--gradient_checkpointing", "every_k"],
    "deepspeed": ["--gradient_checkpointing", "deepspeed"],
}
FREEZE_FLAGS = {
    "static": ["--freeze_first_n_blocks", "1"],
    "progressive_cache": [
        "--freeze_schedule",
        "linear",
        "--freeze_progressive_blocks",
        "1",
        "--freeze_start",
        "0.25",
        "--freeze_end",
        "0.25",
        "--freeze_cache",
        "memory",
    ],
}
OPTIMIZERS = {"adamw": "adamw", "bnb8": "adamw_8bit", "torchao8": "torchao_adamw_8bit"}
SCRIPTS = {
    "train_lm": ("recipes/train_lm.py", "configs/recipes/train_tiny_zero2.yaml"),
    "distill": ("recipes/distill.py", "configs/recipes/distill_tiny_4to2.yaml"),
    "pipeline": ("recipes/train_pipeline.py", "configs/recipes/pipeline_tiny.yaml"),
}
COMMON = [
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--eval_steps",
    str(STEPS),
    "--save_steps",
    "0",
    "--generated_docs",
    "200",
    "--eval_docs",
    "20",
    "--max_eval_batches",
    "2",
    "--report_to",
    "none",
    "--export_final",
    "false",
    "--learning_rate",
    "0.003",
    "--warmup_steps",
    "1",
]


# ---------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A from-config tiny GPT-2 (4 blocks) with the byte tokenizer: the distillation runs' teacher."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    out = str(tmp_path_factory.mktemp("teacher"))
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(
        load_model_config(os.path.join(ROOT, "configs/models/tiny_gpt2.json"), tok)
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def deepspeed_json(combo: dict, tmp_path) -> str:
    with open(os.path.join(ROOT, "configs/deepspeed", DS_BASE[combo["zero"]])) as fh:
        ds = json.load(fh)
    if combo["checkpointing"] == "deepspeed":
        with open(os.path.join(ROOT, "configs/deepspeed/zero2_actckpt.json")) as fh:
            ds["activation_checkpointing"] = json.load(fh)["activation_checkpointing"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


def find(tree, key):
    """The value of `key` in a summary: at the top level, else in the first nested dict that has it."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = find(value, key)
            if found is not None:
                return found
    return None


def losses(out: str) -> list[float]:
    rows = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r and "step" in r]
    phases = {r.get("phase") for r in rows}
    if len(phases) > 1:  # distillation: the distillation phase, not the scratch baseline
        rows = [r for r in rows if r.get("phase") in ("distill", None)]
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("combo", RUNS, ids=IDS)
def test_combination(combo, tmp_path, request):
    assert not rules.fired(compat_doc.combo_settings(combo)), "the table refuses this run"
    script, config = SCRIPTS[combo["recipe"]]
    out = str(tmp_path / "out")
    args = ["--config", config, *COMMON, "--output_dir", out, "--optimizer", OPTIMIZERS[combo["optimizer"]]]
    args += CKPT_FLAGS[combo["checkpointing"]] + FREEZE_FLAGS[combo["freezing"]]
    if combo["recipe"] == "distill":
        args += ["--teacher_name_or_path", request.getfixturevalue("teacher_dir"), "--scratch_baseline", "false"]
    cmd = launch_cmd(script, args, deepspeed=deepspeed_json(combo, tmp_path), num_processes=2)
    cmd.insert(cmd.index(script), "--mixed_precision=bf16")
    run(cmd, timeout=900)

    s = summary(out)
    assert s["status"] == "completed" and find(s, "world_size") == 2, s
    curve = losses(out)
    assert len(curve) >= STEPS and sum(curve[-2:]) < sum(curve[:2]), curve  # the loss falls
    settings = compat_doc.AXES["zero"][combo["zero"]]
    assert find(s, "zero_stage") == settings["zero"], s
    assert find(s, "mixed_precision") == "bf16", s
    assert find(s, "optimizer") == OPTIMIZERS[combo["optimizer"]], s
    assert (find(s, "frozen_params") or 0) > 0, s
    mode = (find(s, "activation_checkpointing") or {}).get("mode")
    if combo["recipe"] == "pipeline" and mode is None:  # the pipeline engine's own checkpointing
        on = (find(s, "activation_checkpoint_interval") or 0) > 0
        assert on == (combo["checkpointing"] != "none"), s
    else:
        want = {"full_reentrant": "full"}.get(combo["checkpointing"], combo["checkpointing"])
        assert mode == want, s
        if combo["checkpointing"].startswith("full"):
            assert find(s, "reentrant") is (combo["checkpointing"] == "full_reentrant"), s
    if combo["freezing"] == "progressive_cache":
        events = find(s, "events") or []
        assert events, s  # at least one freeze point was passed (the engine was rebuilt there)


# ---------------------------------------------------------------------------- the table, the matrix, the doc
def test_design_covers_every_allowed_pair_and_no_run_is_refused():
    allowed = [c for c in compat_doc.all_combos() if not compat_doc.refused_by(c)]
    want = set().union(*(compat_doc.pairs_of(c) for c in allowed))
    got = set().union(*(compat_doc.pairs_of(c) for c in RUNS))
    assert got == want
    assert all(not compat_doc.refused_by(c) for c in RUNS)
    assert len(set(IDS)) == len(IDS) and compat_doc.design() == RUNS  # deterministic
    per_axis_pair = {}
    for (x, u), (y, v) in want:
        per_axis_pair.setdefault((x, y), set()).add((u, v))
    fewest = max(len(p) for p in per_axis_pair.values())  # no design can have fewer runs than this
    assert fewest <= len(RUNS) <= fewest + 5 < len(allowed) / 4, (fewest, len(RUNS), len(allowed))


def test_matrix_agrees_with_the_rule_table():
    cells = compat_doc.matrix(RUNS)
    cited = set()
    for (axis_a, axis_b), table in cells.items():
        for (a, b), (kind, text) in table.items():
            assert kind in ("works", "refused", "gpu") and text, (axis_a, a, axis_b, b)
            completions = [c for c in compat_doc.all_combos() if c[axis_a] == a and c[axis_b] == b]
            ids = re.findall(r"\[([a-z0-9_]+)\]", text)
            cited |= set(ids)
            if kind == "refused":  # a refused cell names the rules, and they refuse every combination with it
                assert ids and all(i in rules.BY_ID for i in ids), text
                assert all(compat_doc.refused_by(c) for c in completions)
            else:
                assert any(not compat_doc.refused_by(c) for c in completions)
    # every rule that refuses every combination with some pair of values shows in that pair's cell, and no run
    # contains a combination that a rule refuses
    for rule in (r for r in rules.RULES if r.refused):
        hits = [c for c in compat_doc.all_combos() if rule.matches(compat_doc.combo_settings(c))]
        pair_level = any(
            all(rule in compat_doc.refused_by(c) for c in compat_doc.all_combos() if c[x] == u and c[y] == v)
            for h in hits
            for (x, u), (y, v) in compat_doc.pairs_of(h)
        )
        assert not pair_level or rule.id in cited, rule.id
        assert not any(h in RUNS for h in hits), rule.id


def test_every_works_cell_names_a_collected_run():
    mark = next(m for m in test_combination.pytestmark if m.name == "parametrize")
    collected = set(mark.kwargs["ids"])
    assert collected == set(IDS)
    for table in compat_doc.matrix(RUNS).values():
        for kind, text in table.values():
            if kind == "works":
                assert re.match(r"^`([^`]+)`", text).group(1) in collected, text


def test_compat_doc_is_up_to_date():
    with open(os.path.join(ROOT, compat_doc.DOC)) as fh:
        assert fh.read() == compat_doc.render(RUNS), "docs/compat.md is stale: run `dsrecipes compat` (make compat)"
