"""Every shipped config is launched by a test, or is a GPU template that `dsrecipes check` passes.

Run: .venv/bin/python -m pytest tests/test_configs.py -q    (seconds: the meta-test and the checks, in process)
A config under configs/{accelerate,deepspeed,recipes}/ counts as launched when a test file under tests/ (or the
test launcher, src/dsrecipes/launching.py, whose default accelerate YAML every launch_cmd uses) names it: by its
file name (`configs/deepspeed/zero3.json`), or by its stem as a quoted string (`STAGES = ["zero0", ...]` feeding
`f"configs/deepspeed/{stage}.json"`). This file does not count. The GPU templates below cannot run on this CPU-only
machine (including one that a GPU-only test names); each has its reason, and `dsrecipes check` (with the launch
line in a recipe's `# Run:` header) must pass on it.
"""

from __future__ import annotations

import os
import re

import pytest

from conftest import ROOT
from test_check import cli_in_process, header_launch

CONFIG_DIRS = ("accelerate", "deepspeed", "recipes")
GPU_TEMPLATES = {
    "configs/accelerate/gpu_1.yaml": "use_cpu: false on one CUDA GPU (gpu_ids: all)",
    "configs/accelerate/gpu_8.yaml": "use_cpu: false, 8 processes on 8 CUDA GPUs",
    "configs/accelerate/multi_node.yaml": "2 machines at addresses to EDIT; the SLURM tests launch train_lm on 2 nodes "
    "with the CPU YAML instead",
    "configs/deepspeed/zero3_actckpt_gpu.json": "cpu_checkpointing: true breaks on the CPU accelerator (refused there, "
    "test_memory_recipes.py::test_recipe_refuses_cpu_checkpointing_on_cpu); its knobs are applied in "
    "test_memory.py::test_every_deepspeed_knob_reaches_deepspeed",
    "configs/recipes/serve_gpu_bf16.yaml": "kernel_inject: true needs DeepSpeed's fused CUDA kernels",
    "configs/recipes/train_gpt2_small_zero2.yaml": "GPT-2 small on WikiText-103 with the hub GPT-2 tokenizer: "
    "network (closed here) and 8 GPUs",
    "configs/recipes/distill_gpt2_12to6.yaml": "the hub GPT-2 weights and WikiText-103: network and 8 GPUs",
    "configs/recipes/distill_gpt2_medium_24to12.yaml": "the hub GPT-2 medium weights and WikiText-103: network and "
    "8 GPUs",
    "configs/recipes/train_tiny_fp16.yaml": "fp16 with dynamic loss scaling needs a GPU; "
    "test_memory_recipes.py::test_fp16_with_loss_scaling_on_gpu launches it where there is one (skipped on CPU)",
    "configs/recipes/finetune_gpt2_small_freeze_cubic.yaml": "the hub GPT-2 weights and WikiText-2: network and 8 GPUs",
    "configs/recipes/sft_llama_1b_zero3.yaml": "the gated hub Llama-3.2-1B weights: network and 8 GPUs",
    "configs/recipes/sft_llama_8b_zero3.yaml": "the gated hub Llama-3.1-8B weights: network and 8 GPUs",
    "configs/recipes/sft_llama_8b_lora_1gpu.yaml": "the gated hub Llama-3.1-8B weights (16 GB in bf16): network and "
    "a GPU",
}


def shipped_configs() -> list[str]:
    return sorted(
        f"configs/{d}/{f}"
        for d in CONFIG_DIRS
        for f in os.listdir(os.path.join(ROOT, "configs", d))
        if f.endswith((".yaml", ".yml", ".json"))
    )


def launching_sources() -> dict[str, str]:
    """Text of every test file (but this one) and of the test launcher, by path."""
    here = os.path.basename(__file__)
    files = [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    files = [f for f in files if os.path.basename(f) != here]
    files.append(os.path.join(ROOT, "src", "dsrecipes", "launching.py"))
    return {os.path.relpath(f, ROOT): open(f).read() for f in sorted(files)}


def named_by(path: str, sources: dict[str, str]) -> list[str]:
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    pattern = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])|[\"']{re.escape(stem)}[\"']")
    return [f for f, text in sources.items() if pattern.search(text)]


def test_every_shipped_config_is_launched_by_a_test():
    sources = launching_sources()
    missing = [p for p in shipped_configs() if p not in GPU_TEMPLATES and not named_by(p, sources)]
    assert not missing, (
        "configs no test launches (launch each from a test under tests/, or, if it truly needs a GPU, add it to "
        f"GPU_TEMPLATES in tests/test_configs.py with the reason): {missing}"
    )


def test_gpu_templates_are_shipped_and_give_a_reason():
    shipped = set(shipped_configs())
    assert set(GPU_TEMPLATES) <= shipped, sorted(set(GPU_TEMPLATES) - shipped)  # no stale entries
    assert all(len(reason) > 20 for reason in GPU_TEMPLATES.values())


def test_the_name_matcher_tells_files_apart():
    sources = {"a.py": 'DS = "configs/accelerate/deepspeed_cpu_2proc.yaml"\nSTAGES = ["zero0"]\n'}
    assert named_by("configs/accelerate/deepspeed_cpu_2proc.yaml", sources) == ["a.py"]
    assert named_by("configs/accelerate/cpu_2proc.yaml", sources) == []  # a suffix of another name is not a name
    assert named_by("configs/deepspeed/zero0.json", sources) == ["a.py"]
    assert named_by("configs/deepspeed/zero3.json", sources) == []


@pytest.mark.parametrize("path", sorted(GPU_TEMPLATES))
def test_gpu_template_passes_dsrecipes_check(path):
    kind = path.split("/")[1]
    args = [{"accelerate": "--accelerate", "deepspeed": "--deepspeed", "recipes": "--recipe"}[kind], path]
    if kind == "recipes":
        for key, file in header_launch(os.path.join(ROOT, path)).items():
            args += [f"--{key}", os.path.relpath(file, ROOT)]
    # in this process (dsrecipes.cli.main, what the console script runs): a fresh `dsrecipes check` interpreter
    # spent 3-19 s per template importing torch/transformers/DeepSpeed; tests/test_check.py keeps one CLI run
    proc = cli_in_process(*args)
    assert proc.returncode == 0 and "no problems" in proc.stdout, (args, proc.stdout, proc.stderr[-2000:])


def _header_text(path: str) -> str:
    """A config's leading comment block as one line (continuation lines joined)."""
    out = []
    with open(os.path.join(ROOT, path)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            out.append(line[1:].strip())
    return " ".join(out)


PLANNED = [p for p in shipped_configs() if p.endswith(".yaml") and "`dsrecipes plan " in _header_text(p)]


@pytest.mark.parametrize("path", PLANNED)
def test_the_plan_figures_in_a_header_are_what_the_planner_prints(path):
    """A header that quotes `dsrecipes plan ...` and its total (`= X GiB`) says what the planner prints today."""
    from conftest import dsrecipes_cli

    text = _header_text(path)
    command = re.search(r"`dsrecipes plan ([^`]+)`", text).group(1)
    quoted = re.search(r"= ([\d.]+) GiB", text[text.index(command) :])
    assert quoted is not None, f"{path}: quote the plan's total (`= X GiB`) after the command"
    proc = dsrecipes_cli("plan", *command.split())
    assert proc.returncode == 0, proc.stderr
    total = re.search(r"total\s+([\d.]+) GiB", proc.stdout).group(1)
    assert total == quoted.group(1), (path, proc.stdout)
