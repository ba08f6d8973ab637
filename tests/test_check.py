"""`dsrecipes check`: every shipped config passes; every known pitfall has a bad config that fails with one line.

Run: .venv/bin/python -m pytest tests/test_check.py -q
"""

import json
import os
import subprocess

import pytest
import yaml

from conftest import BIN, DS_OK, ROOT, child_env, dsrecipes_cli
from dsrecipes.config.check import lint_files


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return str(path)


def cli(*args):
    """`dsrecipes check ARGS` as its own process: the console script, its exit code and its stderr."""
    return subprocess.run(
        [os.path.join(BIN, "dsrecipes"), "check", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_in_process(*args):
    """`dsrecipes check ARGS` in this process (conftest.dsrecipes_cli): same exit code, stdout and stderr."""
    return dsrecipes_cli("check", *args)


def lines(errs):
    return [e.line() for e in errs]


def test_every_shipped_config_passes():
    proc = cli_in_process("--all")
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
    """A number the user QUOTED stays a string and is refused with one line (DeepSpeed JSON, accelerate, recipe)."""
    ds = write(tmp_path, "ds.json", {**DS_OK, "train_micro_batch_size_per_gpu": "8"})
    acc = write(tmp_path, "a.yaml", {"num_processes": "2"})
    out = lines(lint_files(deepspeed=ds)) + lines(lint_files(accelerate=acc))
    assert "number given as a string '8'" in out[0] and "train_micro_batch_size_per_gpu" in out[0]
    assert "num_processes: number given as a string '2'" in out[1]
    for text, key, shown in (
        ('"3e-4"', "learning_rate", "3e-4"),
        ("'1e-4'", "learning_rate", "1e-4"),
        ("'0.001'", "learning_rate", "0.001"),
        ('"8"', "per_device_train_batch_size", "8"),
    ):
        rec = tmp_path / "r.yaml"
        rec.write_text(f"{key}: {text}\n")
        hint = f"write it unquoted: {key}: {shown}" if key == "learning_rate" else f"write it unquoted, e.g. {key}: 8"
        assert lines(lint_files(recipe=str(rec))) == [
            f"error: {rec}: {key}: expected a number, got str '{shown}'; {hint}"
        ], text


@pytest.mark.parametrize(
    "text,yaml11_text", [(t, True) for t in ("3e-4", "1e5", "-2E-3", "3.0e4", "+1e+2")] + [("2.0e-05", False)]
)
def test_unquoted_exponent_float_is_a_number(tmp_path, text, yaml11_text):
    """YAML 1.1 (PyYAML) reads 3e-4 (no dot, or no exponent sign) as text; recipe YAML is read with YAML 1.2 floats."""
    from dsrecipes.config.args import load_yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(f"learning_rate: {text}\nmax_steps: 8\nseed: 1_000\noutput_dir: 1e5x\n")
    values = load_yaml(str(rec))
    assert values == {"learning_rate": float(text), "max_steps": 8, "seed": 1000, "output_dir": "1e5x"}
    assert type(values["learning_rate"]) is float and type(values["max_steps"]) is int
    # what plain PyYAML (YAML 1.1) gives: text, unless there is a dot and a signed exponent (alignment-handbook's form)
    assert yaml.safe_load(rec.read_text())["learning_rate"] == (text if yaml11_text else float(text))
    out = lines(lint_files(recipe=str(rec)))
    if float(text) > 0:
        assert out == []
    else:  # a number now, so the range check (not the type check) answers
        assert out == [f"error: {rec}: learning_rate: {float(text)} is out of range (must be > 0); write a value > 0"]


@pytest.mark.slow
def test_cli_and_a_real_run_read_unquoted_3e_4_as_the_float(tmp_path):
    """`dsrecipes check` passes it, and recipes/train_lm.py (one process, 2 steps) trains with lr 3e-4."""
    import re
    import sys

    from dsrecipes.launching import run

    text = open(os.path.join(ROOT, "configs/recipes/train_tiny_zero2.yaml")).read()
    for key, value in (("learning_rate", "3e-4"), ("lr_scheduler_type", "constant"), ("warmup_steps", "0")):
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    assert "\nlearning_rate: 3e-4\n" in text
    rec = tmp_path / "r.yaml"
    rec.write_text(text)
    proc = cli_in_process("--recipe", str(rec))
    assert proc.returncode == 0 and "no problems" in proc.stdout, proc.stderr
    out = tmp_path / "o"
    flags = ["--max_steps", "2", "--logging_steps", "1", "--eval_steps", "2", "--report_to", "none"]
    # the lr is the point, not the corpus or the export: a small corpus (not the default 2000 + 200 documents)
    flags += ["--generated_docs", "300", "--eval_docs", "40", "--export_final", "false"]
    run([sys.executable, "recipes/train_lm.py", "--config", str(rec), "--output_dir", str(out), *flags], timeout=300)
    logged = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["lr"] for r in logged if "lr" in r] == [3e-4, 3e-4]


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
