"""The one rule table of what combines (dsrecipes.config.rules) and the one "auto" filler
(dsrecipes.config.deepspeed): every refusing rule has a bad config that `dsrecipes check`, the start-up check and
the engine rebuild all refuse with exactly the table's line.

Run: .venv/bin/python -m pytest tests/test_rules.py -q
"""

import json
import os

import pytest

from conftest import ROOT
from dsrecipes.config.check import lint_files
from test_check import cli, lines, write

# ---------------------------------------------------------------------------- the rule table (config/rules.py)
# One bad combination per refusing rule: (DeepSpeed JSON, recipe YAML, accelerate YAML or None)
REFUSED = {
    "lora_freezing": ({"zero_optimization": {"stage": 2}}, {"lora_r": 8, "freeze_first_n_blocks": 1}, None),
    "qlora_zero3": ({"zero_optimization": {"stage": 3}}, {"lora_r": 8, "lora_quantize": "nf4"}, None),
    "zero3_frozen_reentrant": (
        {"zero_optimization": {"stage": 3}},
        {"freeze_first_n_blocks": 2, "gradient_checkpointing": "full", "gradient_checkpointing_reentrant": True},
        None,
    ),
    "progressive_zero3": ({"zero_optimization": {"stage": 3}}, {"freeze_schedule": "linear"}, None),
    "progressive_offload": (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        {"freeze_schedule": "cubic"},
        None,
    ),
    "progressive_zero0_low_precision": (
        {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
        {"freeze_schedule": "linear"},
        None,
    ),
    "progressive_needs_adamw": (
        {"zero_optimization": {"stage": 2}},
        {"freeze_schedule": "adaptive", "optimizer": "adamw_8bit"},
        None,
    ),
    "offload_needs_adamw": (
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
        {"optimizer": "paged_adamw_8bit"},
        None,
    ),
    "offload_ds_optimizer_type": (
        {"optimizer": {"type": "SGD"}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        {},
        None,
    ),
    "param_offload_needs_zero3": ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {}, None),
    "torchao_under_zero": ({"zero_optimization": {"stage": 1}}, {"optimizer": "torchao_adamw_4bit"}, None),
    "cpu_checkpointing_on_cpu": (
        {"zero_optimization": {"stage": 2}, "activation_checkpointing": {"cpu_checkpointing": True}},
        {},
        {"use_cpu": True, "distributed_type": "DEEPSPEED"},
    ),
    "pipeline_section_through_accelerate": ({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 2}}, {}, None),
    "pipeline_zero23": ({"zero_optimization": {"stage": 3}}, {"num_stages": 2}, None),
    "pipeline_progressive": ({"zero_optimization": {"stage": 1}}, {"num_stages": 2, "freeze_schedule": "linear"}, None),
    "pipeline_prefix_cache": ({"zero_optimization": {"stage": 1}}, {"num_stages": 2, "freeze_cache": "memory"}, None),
    "load_universal_zero3": ({"zero_optimization": {"stage": 3}, "checkpoint": {"load_universal": True}}, {}, None),
    "load_universal_by_hand": ({"zero_optimization": {"stage": 1}, "checkpoint": {"load_universal": True}}, {}, None),
    "sp_with_tp": (
        {"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}},
        {"sequence_parallel_size": 2},
        None,
    ),
    "sp_zero3_reduce_scatter_off": (
        {"zero_optimization": {"stage": 3, "reduce_scatter": False}},
        {"sequence_parallel_size": 2},
        None,
    ),
    "sp_zero3_selective_ops_tiled_loss": (
        {"zero_optimization": {"stage": 3}},
        {"sequence_parallel_size": 2, "gradient_checkpointing": "selective_ops", "tiled_loss": True},
        None,
    ),
    "sp_prefix_cache": (
        {"zero_optimization": {"stage": 2}},
        {"sequence_parallel_size": 2, "freeze_embeddings": True, "freeze_cache": "memory"},
        None,
    ),
    "tiling_prefix_cache": (
        {"zero_optimization": {"stage": 2}},
        {"tiled_mlp": True, "freeze_embeddings": True, "freeze_cache": "memory"},
        None,
    ),
    "tp_lora": ({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}}, {"lora_r": 8}, None),
    "tp_pipeline": (
        {"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}},
        {"num_stages": 2},
        None,
    ),
}
# Rules that need the number of processes or the absence of DeepSpeed, which the files above do not give: their
# one-line refusals are tested with real launch configs where the rule lives (tests/test_sequence_parallel.py
# test_refusal_is_one_line_in_check, tests/test_tensor_parallel.py's rule test).
WORLD_RULES = {"sp_needs_deepspeed", "sp_divides_world", "tiling_ddp", "tp_divides_world"}


def refused_files(tmp_path, rule_id):
    ds, rec, acc = REFUSED[rule_id]
    files = {"deepspeed": write(tmp_path, "ds.json", ds), "recipe": write(tmp_path, "r.yaml", rec)}
    if acc is not None:
        files["accelerate"] = write(tmp_path, "a.yaml", {**acc, "deepspeed_config": {"deepspeed_config_file": "x"}})
    return files


def table_line(files, rule_id):
    """The line the table itself writes for this rule on these files' settings."""
    from dsrecipes.config import rules

    ds, rec, acc = REFUSED[rule_id]
    kind = "pipeline" if "num_stages" in rec else "train_lm"
    on_cpu = bool(acc and acc.get("use_cpu")) if acc else None
    settings = rules.settings_from(rec, ds, acc, None, on_cpu, kind)
    return rules.BY_ID[rule_id].error(settings, files).line()


def test_every_refusing_rule_has_a_bad_config_here():
    from dsrecipes.config import rules

    assert set(REFUSED) | WORLD_RULES == {r.id for r in rules.RULES if r.refused}
    assert not set(REFUSED) & WORLD_RULES


@pytest.mark.parametrize("rule_id", sorted(REFUSED))
def test_refused_combination_gives_exactly_the_table_line(tmp_path, rule_id):
    files = refused_files(tmp_path, rule_id)
    out = lines(lint_files(**files))
    assert out == [table_line(files, rule_id)]


@pytest.mark.parametrize("rule_id", ["zero3_frozen_reentrant", "torchao_under_zero", "pipeline_zero23"])
def test_cli_prints_exactly_the_table_line(tmp_path, rule_id):
    files = refused_files(tmp_path, rule_id)
    proc = cli(*[arg for k, v in files.items() for arg in (f"--{k}", v)])
    assert proc.returncode == 2 and proc.stderr.splitlines() == [table_line(files, rule_id)], proc.stderr


def test_rebuild_and_check_ask_the_same_table(tmp_path):
    """freezing.rebuild refuses at run time with the very line `dsrecipes check` gives for the same settings."""
    import types

    from dsrecipes.config.errors import ConfigError
    from dsrecipes.freezing.rebuild import check_rebuild_supported

    for rule_id in ("progressive_zero3", "progressive_offload", "progressive_needs_adamw"):
        ds, rec, _ = REFUSED[rule_id]
        plugin = types.SimpleNamespace(deepspeed_config=ds)
        acc = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), mixed_precision="no")
        args = types.SimpleNamespace(**{"optimizer": "adamw", "freeze_schedule": "none", **rec})
        with pytest.raises(ConfigError) as exc:
            check_rebuild_supported(acc, args, where="r.yaml")
        files = {"deepspeed": "r.yaml", "recipe": "r.yaml"}
        assert exc.value.line() == table_line(files, rule_id)


def test_settings_are_normalised():
    from dsrecipes.config.rules import settings_from

    s = settings_from(
        {"gradient_checkpointing": "full", "gradient_checkpointing_reentrant": True, "freeze_schedule": "linear"},
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}, "bf16": {"enabled": "auto"}},
        {"mixed_precision": "bf16"},
        2,
        True,
    )
    assert (s.zero, s.offload, s.offload_param, s.checkpointing) == (3, "nvme", "none", "hf_full_reentrant")
    assert (s.precision, s.freeze, s.device, s.recipe) == ("bf16", "progressive", "cpu", "train_lm")
    plain = settings_from({"freeze_embeddings": True, "gradient_checkpointing": "every_k"}, None, {}, 1, False)
    assert (plain.zero, plain.freeze, plain.checkpointing, plain.device) == (None, "static", "every_k", "gpu")


def test_notes_are_not_errors(tmp_path):
    """A "works, degraded" rule (the prefix cache turns itself off under every_k) is a note, not a refusal."""
    from dsrecipes.config import rules

    rec = {"freeze_schedule": "linear", "freeze_cache": "memory", "gradient_checkpointing": "every_k"}
    ds = write(tmp_path, "ds.json", {"zero_optimization": {"stage": 2}})
    files = {"deepspeed": ds, "recipe": write(tmp_path, "r.yaml", rec)}
    assert lint_files(**files) == []
    s = rules.settings_from(rec, {"zero_optimization": {"stage": 2}})
    assert [n.split(":")[0] for n in rules.notes(s)] == ["works, degraded"]


def test_load_universal_is_refused_only_when_set_by_hand():
    """checkpoint.load_universal in the JSON: ZeRO-3 breaks the saves (#7546), ZeRO 0-2 every later start; false or
    unset passes (train/elastic.py turns it on for one load, after the start-up check)."""
    from dsrecipes.config import rules

    def fired(stage, value):
        ds = {"zero_optimization": {"stage": stage}, "checkpoint": {"load_universal": value}}
        return [r.id for r in rules.fired(rules.settings_from({}, ds))]

    assert [fired(stage, True) for stage in (0, 1, 2, 3)] == [["load_universal_by_hand"]] * 3 + [
        ["load_universal_zero3"]
    ]
    assert [fired(stage, v) for stage in (0, 1, 2, 3) for v in (False, None, "true")] == [[]] * 12
    assert rules.fired(rules.settings_from({}, {"zero_optimization": {"stage": 3}})) == []
    assert rules.BY_ID["load_universal_zero3"].issue == "deepspeedai/DeepSpeed#7546"


# ---------------------------------------------------------------------------- SP: what the engine cannot train
SP2 = "configs/recipes/train_tiny_llama_sp2.yaml"
DS_2PROC = "configs/accelerate/deepspeed_cpu_2proc.yaml"
SP_ENGINE = {  # rule id -> (zero_optimization overrides of zero3.json, recipe flags, the key, words of the fix)
    "sp_zero3_reduce_scatter_off": (
        {"reduce_scatter": False},
        [],
        "zero_optimization.reduce_scatter",
        "leave reduce_scatter at its default (true)",
    ),
    "sp_zero3_selective_ops_tiled_loss": (
        {},
        ["--gradient_checkpointing", "selective_ops", "--tiled_loss", "true"],
        "gradient_checkpointing",
        "use gradient_checkpointing: full or layer_selective",
    ),
}


def _zero3(tmp_path, extra: dict) -> str:
    with open(os.path.join(ROOT, "configs/deepspeed/zero3.json")) as fh:
        ds = json.load(fh)
    ds["zero_optimization"] |= extra
    return write(tmp_path, "zero3_sp.json", ds)


@pytest.mark.parametrize("rule_id", sorted(SP_ENGINE))
def test_sp_engine_refusal_is_one_line_in_check(tmp_path, rule_id):
    """`dsrecipes check` on the shipped SP recipe under ZeRO-3 with reduce_scatter: false (DeepSpeed #5248: no loss
    scale gives the true gradient) or selective_ops + tiled_loss (its backward fails): one `error:` line naming the
    key and the fix, before anything trains (these were the first step's ConfigError)."""
    from conftest import dsrecipes_cli

    extra, flags, key, fix = SP_ENGINE[rule_id]
    ds = _zero3(tmp_path, extra)
    proc = dsrecipes_cli("check", "--recipe", SP2, "--accelerate", DS_2PROC, "--deepspeed", ds, "--", *flags)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, errors
    where = ds if key.startswith("zero_optimization") else SP2
    assert errors[0].startswith(f"error: {where}: {key}: ") and fix in errors[0], errors[0]
    ok = dsrecipes_cli("check", "--recipe", SP2, "--accelerate", DS_2PROC, "--deepspeed", _zero3(tmp_path, {}))
    assert ok.returncode == 0, ok.stderr[-2000:]  # ZeRO-3 with SP and the defaults passes


def test_start_up_check_sees_reduce_scatter_in_the_json_accelerate_was_given(monkeypatch, tmp_path):
    """The launch path: accelerate's DeepSpeedPlugin, built from ACCELERATE_DEEPSPEED_CONFIG_FILE as under
    `accelerate launch`, keeps zero_optimization.reduce_scatter, so the recipe's check.check_run refuses the run."""
    import types

    from accelerate.utils import DeepSpeedPlugin

    from dsrecipes.config import args as recipe_args
    from dsrecipes.config import check

    ds = _zero3(tmp_path, {"reduce_scatter": False})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ds)
    plugin = DeepSpeedPlugin()
    assert plugin.deepspeed_config["zero_optimization"]["reduce_scatter"] is False
    args, _ = recipe_args.parse_args(recipe_args.RECIPES["train_lm"], ["--config", SP2])
    acc = types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=plugin),
        mixed_precision="no",
        num_processes=2,
        device=types.SimpleNamespace(type="cpu"),
    )
    with pytest.raises(check.ConfigErrors) as exc:
        check.check_run(acc, args, SP2)
    assert str(exc.value).startswith(f"error: {ds}: zero_optimization.reduce_scatter: false with sequence_parallel")


# ---------------------------------------------------------------------------- the one "auto" filler
@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs/deepspeed")) if f.endswith(".json"))
)
def test_fill_auto_leaves_no_auto_in_a_shipped_config(name):
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.config.deepspeed import RECIPE_OWNED, fill_auto, remaining_auto

    with open(os.path.join(ROOT, "configs/deepspeed", name)) as fh:
        raw = json.load(fh)
    args, _ = parse_args(RECIPES["train_lm"], ["--gradient_accumulation_steps", "3", "--max_grad_norm", "0.5"])
    ds = fill_auto(json.loads(json.dumps(raw)), args, 2, "bf16", hidden_size=128)
    assert remaining_auto(ds) == []
    for key, want in (
        ("train_micro_batch_size_per_gpu", 8),
        ("gradient_accumulation_steps", 3),
        ("train_batch_size", 8 * 3 * 2),
        ("gradient_clipping", 0.5),
    ):
        if raw.get(key) == "auto":
            assert ds[key] == want, key
    if (raw.get("bf16") or {}).get("enabled") == "auto":
        assert ds["bf16"]["enabled"] is True and ds.get("fp16", {}).get("enabled", False) is False
    if (raw.get("zero_optimization") or {}).get("reduce_bucket_size") == "auto":
        assert ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    without_h = fill_auto(json.loads(json.dumps(raw)), args, 2, "no")  # no hidden size: DeepSpeed's defaults
    assert remaining_auto(without_h) == [] and "reduce_bucket_size" not in without_h.get("zero_optimization", {})
    owned = fill_auto(json.loads(json.dumps(raw)), args, 2, "bf16", keys=RECIPE_OWNED)
    assert set(remaining_auto(raw)) - set(remaining_auto(owned)) <= set(RECIPE_OWNED)


def test_lint_accepts_auto_exactly_where_the_filler_fills():
    from dsrecipes.config.deepspeed import FILLED_AUTO
    from dsrecipes.config.lint import lint_deepspeed

    ds: dict = {}
    for dotted in FILLED_AUTO:
        *parents, leaf = dotted.split(".")
        node = ds
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = "auto"
    assert [e for e in lint_deepspeed(ds, "d.json") if "nothing fills" in e.problem] == []
    ds["zero_optimization"]["sub_group_size"] = "auto"
    assert [e.key for e in lint_deepspeed(ds, "d.json") if "nothing fills" in e.problem] == [
        "zero_optimization.sub_group_size"
    ]
