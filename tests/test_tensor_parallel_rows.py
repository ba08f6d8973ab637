"""The AutoTP rows of docs/compat.md that need a launch of their own (dsrecipes.config.compat_tp names these tests):
ZeRO-0 with torchao 8-bit AdamW, ZeRO-2 offload, ZeRO-3 offload, bitsandbytes 8-bit AdamW, 4 processes as
2 data-parallel x 2 TP ranks with progressive freezing and the memory cache, and recipes/distill.py with a TP
student. Every run is recipes/train_lm.py (or distill.py) on the tiny Llama (configs/recipes/train_tiny_llama_tp2.yaml)
for 6 steps at a global batch of 4 sequences, against data-parallel training of the same model on the same batch:
a TP group is one data-parallel rank of 4 sequences, the data-parallel run 2 ranks of 2.

The DeepSpeed JSONs are the shipped zero{1,2,3}_tp2.json with the one change a row names (stage 0, the offloads),
written next to the runs. Runs are module-scoped and shared; each takes 20-150 s on 2 busy cores (8-bit optimizers
and ZeRO-3 offload are the slow ones on CPU).

Run: .venv/bin/python -m pytest tests/test_tensor_parallel_rows.py -q      (part of make test; ~5-7 min of launches)
"""

import json
import os

import pytest

from conftest import ROOT, launch_cmd, read_jsonl, run, summary, tiny_run, train_curve

TP_YAML = "configs/recipes/train_tiny_llama_tp2.yaml"
DISTILL_YAML = "configs/recipes/distill_tiny_llama.yaml"
SHORT = {"max_steps": 6, "eval_steps": 6, "save_steps": 100}
DP = {"per_device_train_batch_size": 2}  # 2 data-parallel ranks of 2 = one TP group of 4
# Progressive freezing of blocks 0 and 1 after steps 1 and 2, on a corpus of 8 blocks (2 steps an epoch), so later
# epochs find frozen-prefix outputs in the memory cache.
FREEZE = {
    "freeze_schedule": "linear",
    "freeze_progressive_blocks": 2,
    "freeze_start": 0.2,
    "freeze_end": 0.4,
    "freeze_cache": "memory",
    "generated_docs": 6,
}
CPU = {"device": "cpu", "pin_memory": False}
# name -> (processes, recipe, DeepSpeed JSON, changes to its zero_optimization (None: remove the key), overrides)
RUNS = {
    "dp2": (2, "train_lm", "zero1.json", {}, DP),
    "tp2_zero0_torchao": (
        2,
        "train_lm",
        "zero1_tp2.json",
        {"stage": 0, "reduce_bucket_size": None},
        {"optimizer": "torchao_adamw_8bit"},
    ),
    "tp2_zero2_offload": (2, "train_lm", "zero2_tp2.json", {"offload_optimizer": CPU}, {}),
    "tp2_zero3_offload": (2, "train_lm", "zero3_tp2.json", {"offload_optimizer": CPU, "offload_param": CPU}, {}),
    "tp2_bnb": (2, "train_lm", "zero1_tp2.json", {}, {"optimizer": "adamw_8bit"}),
    "dp2_freeze": (2, "train_lm", "zero1.json", {}, {**DP, **FREEZE}),
    "dp2xtp2_freeze": (4, "train_lm", "zero1_tp2.json", {}, {**DP, **FREEZE}),
    "dp2_distill": (2, "distill", "zero1.json", {}, DP),
    "tp2_distill": (2, "distill", "zero1_tp2.json", {}, {}),
}
_runs: dict = {}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensor_parallel_rows"))


def _deepspeed(tmp_root: str, name: str, base: str, changes: dict) -> str:
    """The shipped configs/deepspeed/BASE, or a copy next to the runs with `changes` made to its zero_optimization."""
    if not changes:
        return f"configs/deepspeed/{base}"
    with open(os.path.join(ROOT, "configs/deepspeed", base)) as fh:
        config = json.load(fh)
    zero = config["zero_optimization"]
    for key, value in changes.items():
        if value is None:
            zero.pop(key)
        else:
            zero[key] = value
    path = os.path.join(tmp_root, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(config, fh, indent=2)
    return path


def train(tmp_root: str, name: str) -> str:
    """The output directory of run `name`, launched on first use."""
    if name not in _runs:
        nproc, recipe, base, changes, overrides = RUNS[name]
        out = os.path.join(tmp_root, name)
        if recipe == "distill":  # the teacher: the data-parallel reference run's final/ (4 layers -> 2)
            flags = tiny_run(DISTILL_YAML, **SHORT, **overrides)
            flags += ["--teacher_name_or_path", os.path.join(train(tmp_root, "dp2"), "final")]
            flags += ["--scratch_baseline", "false"]
        else:
            flags = tiny_run(TP_YAML, **SHORT, **overrides)
        ds = _deepspeed(tmp_root, name, base, changes)
        cmd = launch_cmd(f"recipes/{recipe}.py", flags + ["--output_dir", out], deepspeed=ds, num_processes=nproc)
        run(cmd, timeout=900)
        _runs[name] = out
    return _runs[name]


def _worst(a: list, b: list) -> float:
    """The largest relative loss difference of two curves of the same steps."""
    assert [x[0] for x in a] == [y[0] for y in b], (a, b)
    return max(abs(x[1] - y[1]) / abs(y[1]) for x, y in zip(a, b))


def _same_training(tp: str, dp: str, rtol: float) -> float:
    """tp's loss curve is dp's within rtol at each of the 6 steps, on the same data (every TP group trained on one
    batch: parallel.tensor.data_sum raises otherwise), with the same tokens and eval loss. Returns the worst
    relative difference."""
    tp_curve, dp_curve = train_curve(tp), train_curve(dp)
    assert len(tp_curve) == 6, tp_curve
    worst = _worst(tp_curve, dp_curve)
    assert worst <= rtol, (worst, tp_curve, dp_curve)
    assert [d for _, _, d in tp_curve] == [d for _, _, d in dp_curve]
    s_tp, s_dp = summary(tp), summary(dp)
    assert s_tp["status"] == "completed" and s_tp["tensor_parallel"]["tp_size"] == 2
    assert s_tp["tokens"] == s_dp["tokens"] == 6 * 4 * 128
    assert abs(s_tp["final_eval_loss"] - s_dp["final_eval_loss"]) <= rtol * s_dp["final_eval_loss"]
    return worst


def _state_bytes_per_param_byte(s: dict) -> float:
    """The optimizer's own state bytes (without DeepSpeed's fp32 master copy) over the parameter bytes this rank
    holds, measured at the first step: 2.0 for fp32 AdamW (exp_avg and exp_avg_sq) with nothing partitioned."""
    at = s["memory"]["at_step"]
    return (at["optimizer_states"] - at["master_weights"]) / at["parameters"]


# ---------------------------------------------------------------------------- ZeRO stages and offload
@pytest.mark.slow
def test_zero0_with_torchao_8bit_adamw_tracks_data_parallel(tmp_root):
    """Rows "ZeRO-0" and "torchao 8-bit, ZeRO-0" (torchao keeps fp32 state under ZeRO 1-3: rule torchao_under_zero):
    the same data and tokens as fp32 AdamW data parallel, the curve within 1e-4 (8-bit moments), and 8-bit
    state bytes: under 0.4x fp32 AdamW's per parameter byte."""
    tp, dp = train(tmp_root, "tp2_zero0_torchao"), train(tmp_root, "dp2")
    s = summary(tp)
    assert s["zero_stage"] == 0 and s["optimizer"] == "torchao_adamw_8bit" and s["world_size"] == 2
    worst = _same_training(tp, dp, rtol=1e-4)
    per_param = _state_bytes_per_param_byte(s)
    print(
        f"tp=2 ZeRO-0 torchao 8-bit: max relative loss difference to fp32 dp=2 {worst:.2e}; "
        f"state bytes per parameter byte {per_param:.3f} (fp32 AdamW 2.0)"
    )
    assert 0.5 <= per_param < 0.8, per_param  # 2 x 1 byte per 4-byte parameter, plus scales and small fp32 tensors


@pytest.mark.slow
def test_zero2_offload_matches_data_parallel(tmp_root):
    """Row "ZeRO-2 offload": optimizer states on the CPU through DeepSpeedCPUAdam (accelerate swaps torch AdamW
    for it under offload_optimizer): the same fp32 training as torch AdamW data parallel."""
    tp, dp = train(tmp_root, "tp2_zero2_offload"), train(tmp_root, "dp2")
    assert summary(tp)["zero_stage"] == 2
    worst = _same_training(tp, dp, rtol=1e-5)
    print(f"tp=2 ZeRO-2 offload vs dp=2: max relative loss difference {worst:.2e}")
    assert _state_bytes_per_param_byte(summary(tp)) == pytest.approx(2.0, abs=0.01)  # one data-parallel rank


@pytest.mark.slow
def test_zero3_offload_of_parameters_and_optimizer_matches_data_parallel(tmp_root):
    """Row "ZeRO-3 offload": zero3_tp2.json (no train_batch_size: parallel.tensor.check_model) with parameters and
    optimizer offloaded to the CPU."""
    tp, dp = train(tmp_root, "tp2_zero3_offload"), train(tmp_root, "dp2")
    assert summary(tp)["zero_stage"] == 3
    worst = _same_training(tp, dp, rtol=1e-5)
    print(f"tp=2 ZeRO-3 offload vs dp=2: max relative loss difference {worst:.2e}")


# ---------------------------------------------------------------------------- 8-bit AdamW (bitsandbytes)
@pytest.mark.slow
def test_bnb_8bit_adamw_zero1_tracks_data_parallel(tmp_root):
    """Row "bnb 8-bit AdamW": bitsandbytes quantizes the flat fp32 partition ZeRO-1 hands it (this TP rank's
    shards); the curve stays within 1e-4 of fp32 AdamW data parallel, the state is 8-bit."""
    tp, dp = train(tmp_root, "tp2_bnb"), train(tmp_root, "dp2")
    s = summary(tp)
    assert s["zero_stage"] == 1 and s["optimizer"] == "adamw_8bit"
    worst = _same_training(tp, dp, rtol=1e-4)
    per_param = _state_bytes_per_param_byte(s)
    print(
        f"tp=2 ZeRO-1 bnb 8-bit: max relative loss difference to fp32 dp=2 {worst:.2e}; "
        f"state bytes per parameter byte {per_param:.3f} (fp32 AdamW 2.0)"
    )
    assert 0.5 <= per_param < 0.8, per_param


# ---------------------------------------------------------------------------- 4 processes, progressive freezing
@pytest.mark.slow
def test_four_processes_2dp_x_2tp_with_progressive_freeze_and_cache_match_data_parallel(tmp_root):
    """Rows "4 processes: 2 data-parallel x 2 TP" and "progressive freeze + memory cache": ranks (0, 1) and (2, 3)
    are the TP groups, each a data-parallel rank of 2 sequences; blocks 0 and 1 freeze (two engine rebuilds under
    AutoTP) and the second epoch reads the frozen prefix from the cache. The same training, freezing and cache
    figures as 2 data-parallel processes."""
    tp, dp = train(tmp_root, "dp2xtp2_freeze"), train(tmp_root, "dp2_freeze")
    s_tp, s_dp = summary(tp), summary(dp)
    assert s_tp["world_size"] == 4 and s_tp["zero_stage"] == 1
    worst = _same_training(tp, dp, rtol=1e-5)
    f_tp, f_dp = s_tp["freezing"], s_dp["freezing"]
    events = [(e["step"], e["frozen_units"], e["prefix_depth"]) for e in f_tp["events"]]
    assert events == [(e["step"], e["frozen_units"], e["prefix_depth"]) for e in f_dp["events"]]
    assert [units for _, units, _ in events] == [1, 2] and f_tp["frozen_weights_unchanged"] is True
    # frozen_params counts this rank's tensors: the frozen blocks' Linear layers are halves on a TP rank
    assert 0.5 * f_dp["final_frozen_params"] < f_tp["final_frozen_params"] < f_dp["final_frozen_params"]
    c_tp, c_dp = f_tp["cache"], f_dp["cache"]  # rank 0 of each: the same 2 sequences a step
    print(
        f"dp=2 x tp=2, progressive freeze: max relative loss difference {worst:.2e}; freeze events {events}; "
        f"cache hits {c_tp['hits']}/{c_tp['hits'] + c_tp['misses']} (dp=2: {c_dp['hits']}/"
        f"{c_dp['hits'] + c_dp['misses']}), {c_tp['mib']} MiB"
    )
    assert c_tp["off_reason"] is None and c_tp["depth"] == 2
    assert (c_tp["hits"], c_tp["misses"]) == (c_dp["hits"], c_dp["misses"]) and c_tp["hits"] > 0


# ---------------------------------------------------------------------------- distillation, TP student
@pytest.mark.slow
def test_distill_with_tp_student_matches_data_parallel(tmp_root):
    """Row "distillation recipe": the 2-layer student (teacher layers 0 and 2) sharded by AutoTP, the 4-layer
    teacher plain and whole on each rank: the same loss terms, data and eval losses as data-parallel distillation."""
    tp, dp = train(tmp_root, "tp2_distill"), train(tmp_root, "dp2_distill")
    s_tp, s_dp = summary(tp), summary(dp)
    rows = {}
    for name, out in (("tp", tp), ("dp", dp)):
        rows[name] = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("phase") == "distill"]
        rows[name] = [r for r in rows[name] if "kd" in r]
    assert len(rows["tp"]) == len(rows["dp"]) == 6
    worst = _worst(*[[(r["step"], r["loss"]) for r in rows[n]] for n in ("tp", "dp")])
    assert worst <= 1e-5, worst
    # Each term within 1e-5 of max(|term|, 1): kd starts near 0.003 (the student copies teacher layers), where
    # fp32 noise of 4e-8 is already 1e-5 relative
    pairs = list(zip(rows["tp"], rows["dp"]))
    terms = {t: max(abs(a[t] - b[t]) / max(abs(b[t]), 1.0) for a, b in pairs) for t in ("kd", "ce", "cos")}
    print(
        f"distill tp=2 student vs dp=2: loss max relative difference {worst:.2e}; terms "
        + ", ".join(f"{t} {v:.1e}" for t, v in terms.items())
    )
    assert max(terms.values()) <= 1e-5, terms
    assert [r["data_sum"] for r in rows["tp"]] == [r["data_sum"] for r in rows["dp"]]
    assert s_tp["layer_map"] == s_dp["layer_map"] == [0, 2] and s_tp["world_size"] == 2
    assert s_tp["teacher"]["eval_loss"] == pytest.approx(s_dp["teacher"]["eval_loss"], rel=1e-6)
    assert s_tp["student"]["eval_loss"] == pytest.approx(s_dp["student"]["eval_loss"], rel=1e-5)
    assert 0.5 * s_dp["params"] < s_tp["params"] < s_dp["params"]  # this rank's student: Linear layers halved


# ---------------------------------------------------------------------------- the table names real tests
def test_every_works_row_of_the_tp_table_names_a_test_that_exists():
    """docs/compat.md's TP section: each cell works, is refused or is GPU only (issue 13), and each **works** cell
    is `FILE::test_name`, a test function of that file."""
    import re

    from dsrecipes.config import compat_tp

    rows = compat_tp.tp_rows()
    assert {kind for _, kind, _ in rows} <= {"works", "refused", "gpu"}, rows
    works = [text.strip("`") for _, kind, text in rows if kind == "works"]
    for ref in works:
        path, name = ref.split("::")
        with open(os.path.join(ROOT, path)) as fh:
            assert re.search(rf"^def {name}\(", fh.read(), re.M), ref
    here = {ref.split("::")[1] for ref in works if ref.startswith("tests/test_tensor_parallel_rows.py::")}
    with open(__file__) as fh:
        slow = set(re.findall(r"^@pytest\.mark\.slow\ndef (test_\w+)\(", fh.read(), re.M))
    assert here == slow, (here, slow)  # every launch test here backs a row
