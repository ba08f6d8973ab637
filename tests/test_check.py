"""`dsrecipes check`: every shipped config passes; every known pitfall has a bad config that fails with one line.

Run: .venv/bin/python -m pytest tests/test_check.py -q
"""

import json
import os
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT, child_env
from dsrecipes.config.check import lint_files

DS_OK = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2},
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return str(path)


def cli(*args):
    return subprocess.run(
        [os.path.join(BIN, "dsrecipes"), "check", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines(errs):
    return [e.line() for e in errs]


def test_every_shipped_config_passes():
    proc = cli("--all")
    assert proc.returncode == 0, proc.stderr
    assert "no problems" in proc.stdout
    n = len(
        [
            f
            for d in ("accelerate", "deepspeed", "recipes")
            for f in os.listdir(os.path.join(ROOT, "configs", d))
            if f.endswith((".yaml", ".json"))
        ]
    )
    assert f"{n} file(s) checked" in proc.stdout


@pytest.mark.parametrize(
    "acc", sorted(f for f in os.listdir(os.path.join(ROOT, "configs/accelerate")) if f.endswith(".yaml"))
)
def test_accelerate_yaml_with_its_deepspeed_json_passes(acc):
    assert lint_files(accelerate=os.path.join(ROOT, "configs/accelerate", acc)) == []


def header_launch(path: str) -> dict:
    """The accelerate/DeepSpeed files named by a recipe YAML's `# Run:` header (the command users copy)."""
    import re

    header, in_run = "", False
    for line in open(path):  # the `# Run:` line and its backslash continuations, not the prose around it
        in_run = in_run or line.startswith("# Run")
        if in_run:
            header += line
            if not line.rstrip().endswith("\\"):
                break
    found = {}
    for flag, key in (("--config_file", "accelerate"), ("--deepspeed_config_file", "deepspeed")):
        m = re.search(rf"{flag}[ =](\S+)", header)
        if m:
            found[key] = os.path.join(ROOT, m.group(1))
    return found


@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs/recipes")) if f.endswith(".yaml"))
)
def test_recipe_passes_with_the_launch_line_in_its_header(name):
    path = os.path.join(ROOT, "configs/recipes", name)
    assert any(line.startswith("# Run") or line.startswith("# Run:") for line in open(path)), (
        "header needs a # Run: line"
    )
    launch = header_launch(path)
    errs = lint_files(recipe=path, **launch)
    assert errs == [], (name, launch, lines(errs))


# ---------------------------------------------------------------------------- one bad config per pitfall
def test_value_set_in_two_places(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "gradient_accumulation_steps": 4})
    rec = write(tmp_path, "r.yaml", {"gradient_accumulation_steps": 2})
    out = lines(lint_files(deepspeed=ds, recipe=rec))
    assert (
        len(out) == 1
        and f"error: {ds}: gradient_accumulation_steps: 4 here but gradient_accumulation_steps=2" in out[0]
    )


def test_mixed_precision_in_two_places(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "bf16": {"enabled": True}})
    acc = write(
        tmp_path,
        "a.yaml",
        {
            "distributed_type": "DEEPSPEED",
            "mixed_precision": "no",
            "num_processes": 2,
            "deepspeed_config": {"deepspeed_config_file": ds},
        },
    )
    out = lines(lint_files(accelerate=acc))
    assert any(": bf16.enabled: True here but mixed_precision='no'" in ln for ln in out), out


def test_auto_with_nothing_to_fill(tmp_path):
    ds = write(
        tmp_path, "ds.json", {**DS_OK, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}
    )
    out = lines(lint_files(deepspeed=ds))
    assert out == [f'error: {ds}: optimizer.params.betas: "auto" but nothing fills this value; write a concrete value']


def test_number_as_string(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "train_micro_batch_size_per_gpu": "8"})
    rec = write(tmp_path, "r.yaml", {"learning_rate": "1e-4"})
    acc = write(tmp_path, "a.yaml", {"num_processes": "2"})
    out = lines(lint_files(deepspeed=ds)) + lines(lint_files(recipe=rec)) + lines(lint_files(accelerate=acc))
    assert "number given as a string '8'" in out[0] and "train_micro_batch_size_per_gpu" in out[0]
    assert "learning_rate: expected a number, got str '1e-4'" in out[1]
    assert "num_processes: number given as a string '2'" in out[2]


def test_batch_arithmetic(tmp_path):
    ds = write(
        tmp_path,
        "ds.json",
        {**DS_OK, "train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2},
    )
    acc = write(
        tmp_path,
        "a.yaml",
        {"distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": {"deepspeed_config_file": ds}},
    )
    out = lines(lint_files(accelerate=acc))
    assert out == [
        f"error: {ds}: train_batch_size: 64 != micro 8 x accumulation 2 x world size 2 = 32; "
        'write "auto" or the product'
    ]


def test_pipeline_section_through_accelerate(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "pipeline": {"stages": 2}})
    out = lines(lint_files(deepspeed=ds))
    assert len(out) == 1 and "pipeline: has no effect through accelerate" in out[0] and "train_pipeline.py" in out[0]


def test_zero3_frozen_reentrant(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "zero_optimization": {"stage": 3}})
    rec = write(
        tmp_path,
        "r.yaml",
        {"freeze_first_n_blocks": 2, "gradient_checkpointing": "full", "gradient_checkpointing_reentrant": True},
    )
    out = lines(lint_files(deepspeed=ds, recipe=rec))
    assert len(out) == 1 and "gradient_checkpointing_reentrant: ZeRO-3 with frozen parameters" in out[0]
    rec_ok = write(tmp_path, "ok.yaml", {"freeze_first_n_blocks": 2, "gradient_checkpointing": "full"})
    assert lint_files(deepspeed=ds, recipe=rec_ok) == []


def test_offload_with_optimizer_it_cannot_offload(tmp_path):
    ds = write(
        tmp_path, "ds.json", {**DS_OK, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    )
    rec = write(tmp_path, "r.yaml", {"optimizer": "adamw_8bit"})
    out = lines(lint_files(deepspeed=ds, recipe=rec))
    assert len(out) == 1 and "optimizer: adamw_8bit cannot be offloaded" in out[0]
    ds2 = write(
        tmp_path,
        "ds2.json",
        {
            **DS_OK,
            "optimizer": {"type": "SGD"},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        },
    )
    assert "optimizer.type: 'sgd' cannot run on the offload device" in lines(lint_files(deepspeed=ds2))[0]


@pytest.mark.parametrize("kind", ["deepspeed", "zero", "accelerate", "recipe"])
def test_unknown_key(tmp_path, kind):
    if kind == "deepspeed":
        path = write(tmp_path, "ds.json", {**DS_OK, "gradient_clip": 1.0})
        key = "gradient_clip"
    elif kind == "zero":
        path = write(tmp_path, "ds.json", {**DS_OK, "zero_optimization": {"stage": 2, "offload_optimiser": {}}})
        key = "zero_optimization.offload_optimiser"
    elif kind == "accelerate":
        path = write(tmp_path, "a.yaml", {"num_process": 2})
        key = "num_process"
    else:
        path = write(tmp_path, "r.yaml", {"learning_rat": 0.1})
        key = "learning_rat"
    out = lines(
        lint_files(**{("recipe" if kind == "recipe" else "accelerate" if kind == "accelerate" else "deepspeed"): path})
    )
    assert len(out) == 1 and out[0].startswith(f"error: {path}: {key}: unknown"), out


def test_cpu_checkpointing_refused_on_cpu(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "activation_checkpointing": {"cpu_checkpointing": True}})
    acc = write(
        tmp_path,
        "a.yaml",
        {"use_cpu": True, "deepspeed_config": {"deepspeed_config_file": ds}, "distributed_type": "DEEPSPEED"},
    )
    out = lines(lint_files(accelerate=acc))
    assert len(out) == 1 and "activation_checkpointing.cpu_checkpointing: breaks on the CPU accelerator" in out[0]


def test_cli_reports_one_line_per_problem_and_exit_2(tmp_path):
    ds = write(tmp_path, "ds.json", {**DS_OK, "pipeline": {}, "train_micro_batch_size_per_gpu": "8"})
    proc = cli("--deepspeed", ds)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and all(ln.startswith(f"error: {ds}: ") for ln in err)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content,needle",
    [(None, "file not found"), ("{bad json", "invalid JSON"), ("[1, 2]", "top level must be an object")],
)
def test_bad_files(tmp_path, content, needle):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    proc = cli("--deepspeed", str(path))
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: [1, 2\n")
    proc = cli("--recipe", str(path))
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- the rule table (config/rules.py)
# One bad combination per refusing rule: (DeepSpeed JSON, recipe YAML, accelerate YAML or None)
REFUSED = {
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
}


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

    assert set(REFUSED) == {r.id for r in rules.RULES if r.refused}


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
