"""dsrecipes.compat, the one package of library workarounds: every entry is verified against the pinned version,
guarded, and reported; the launch it refuses (MULTI_CPU started alone) is detected from the launcher's environment.

Run: .venv/bin/python -m pytest tests/test_workarounds.py -q      (seconds)
"""

import glob
import re
import subprocess
import sys
import types
import warnings

import pytest

from conftest import ROOT, child_env
from dsrecipes import compat


def pinned() -> dict[str, str]:
    with open(f"{ROOT}/constraints.txt") as fh:
        pins = dict(line.strip().split("==", 1) for line in fh if "==" in line and not line.startswith("#"))
    return {k.lower(): v for k, v in pins.items()}


def test_every_workaround_is_verified_against_the_pinned_version_and_names_its_issue():
    pins = pinned()
    for name, w in compat.WORKAROUNDS.items():
        assert w.package.lower() in pins, (name, w.package)
        assert w.verified == pins[w.package.lower()].split("+")[0], (name, w.verified, pins[w.package.lower()])
        assert re.search(r"#\d+|no upstream issue found", w.issue), (name, w.issue)
        assert not compat.outdated(name), name  # the pinned install is the verified one


def test_every_workaround_is_used_by_the_code():
    src = subprocess.run(["grep", "-rhoE", r'"[a-z0-9_]+"', f"{ROOT}/src/dsrecipes"], capture_output=True, text=True)
    used = {s.strip('"') for s in src.stdout.split()}
    body = "".join(open(path).read() for path in glob.glob(f"{ROOT}/src/dsrecipes/compat/*.py"))
    for name in compat.WORKAROUNDS:
        assert body.count(f'"{name}"') >= 2 or name in used, f"{name} is listed but never guarded or used"


def test_a_newer_library_warns_once_with_the_issue_to_recheck(monkeypatch):
    name = next(iter(compat.WORKAROUNDS))
    w = compat.WORKAROUNDS[name]
    monkeypatch.setitem(compat.WORKAROUNDS, name, compat.Workaround(w.package, "0.0.1", w.issue, w.what))
    monkeypatch.setattr(compat.registry, "_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compat.guard(name)
        compat.guard(name)
    msgs = [str(x.message) for x in seen if issubclass(x.category, compat.CompatWarning)]
    assert len(msgs) == 1 and f"dsrecipes.compat.{name} was written for {w.package} <= 0.0.1" in msgs[0]
    assert w.issue in msgs[0]


def test_guard_reads_the_installed_version_once_per_package(monkeypatch):
    """guard() runs on every call of a workaround (measure.model_state_bytes: ~830 times in a 2-step run): the
    package metadata is read once per process and package, then cached (compat.registry._version)."""
    reads = []

    def counting(package):
        reads.append(package)
        return "1.0"

    monkeypatch.setattr(compat.registry, "installed_version", counting)
    compat.registry._version.cache_clear()
    try:
        name = next(iter(compat.WORKAROUNDS))
        for _ in range(500):
            compat.guard(name)
        assert reads == [compat.WORKAROUNDS[name].package]
        assert compat.registry._version.cache_info().hits >= 499
    finally:
        compat.registry._version.cache_clear()  # the next caller reads the real metadata again


def test_import_paths_and_no_torch():
    """`compat.X` and `from dsrecipes.compat import X` name the same objects, every public name of the package's
    modules is re-exported, and importing the package imports no torch (a fresh interpreter)."""
    from dsrecipes.compat import deepspeed, hf, registry

    for module in (deepspeed, hf, registry):
        for name in dir(module):
            value = getattr(module, name)
            if callable(value) and getattr(value, "__module__", None) == module.__name__:
                assert getattr(compat, name) is value, name
    code = "import sys, dsrecipes.compat; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_run_without_lora_imports_no_peft_and_lora_still_gets_it():
    """The recipes' scheduler path (limits.scheduler_types at parse time, accelerator.make_scheduler) imports
    transformers.optimization without peft and bitsandbytes (compat.transformers_optimization: ~3 s a process); the
    schedule is transformers' own, transformers keeps its real peft check, and LoRA's own peft import still works
    afterwards, with transformers' PEFT integration intact. A fresh interpreter."""
    code = """
import sys, torch
from types import SimpleNamespace
from dsrecipes.config.limits import scheduler_types
from dsrecipes.train.accelerator import make_scheduler
assert "cosine" in scheduler_types()
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
sched = make_scheduler(opt, SimpleNamespace(lr_scheduler_type="linear", warmup_steps=2, max_steps=4))
lrs = []
for _ in range(4):
    lrs.append(sched.get_last_lr()[0]); opt.step(); sched.step()
print(lrs, "peft" in sys.modules, "bitsandbytes" in sys.modules)
import transformers.utils as hf_utils
import peft
print(hf_utils.is_peft_available(), type(sched).__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == "[0.0, 0.5, 1.0, 0.5] False False", out.stdout
    assert second == "True torch.optim.lr_scheduler", out.stdout


def test_zero3_init_keeps_the_dtype_it_is_given():
    """DeepSpeed 0.19.8's Init._set_dtype drops an explicit dtype where the accelerator lacks fp16 and picks bfloat16
    (the grouping of its `or`/`if` chain, and PR #8428's missing call): the engine's Init of an fp32 ZeRO-3 run then
    swapped parameters to NVMe through bfloat16 buffers on most CPUs (tests/test_offload.py). With
    compat.keep_zero3_init_dtype the given dtype is kept, the config still decides without one, and nothing is
    patched outside a DeepSpeed launch. A fresh interpreter (the patch is process-wide)."""
    code = """
import os, torch
from types import SimpleNamespace as NS
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.partition_parameters import Init
from dsrecipes import compat
cfg = lambda bf16: NS(bfloat16_config=NS(enabled=bf16), float16_config=NS(enabled=False))
def picked(ds_config, dtype):
    obj = NS(); Init._set_dtype(obj, ds_config, dtype); return str(obj.dtype)
before = picked(None, torch.float32)
compat.keep_zero3_init_dtype()  # no DeepSpeed launch: a no-op
untouched = picked(None, torch.float32) == before
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
compat.keep_zero3_init_dtype(); compat.keep_zero3_init_dtype()  # once
print(bool(get_accelerator().is_fp16_supported()), before, untouched, picked(None, torch.float32),
      picked(cfg(True), None), picked(cfg(False), None))
"""
    env = {k: v for k, v in child_env().items() if k != "ACCELERATE_USE_DEEPSPEED"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    fp16, before, untouched, given, bf16_cfg, fp32_cfg = out.stdout.strip().splitlines()[-1].split()
    assert before == ("torch.float32" if fp16 == "True" else "torch.bfloat16"), out.stdout  # the bug, on this CPU
    assert untouched == "True" and given == "torch.float32", out.stdout
    assert (bf16_cfg, fp32_cfg) == ("torch.bfloat16", "torch.float32"), out.stdout


@pytest.mark.parametrize(
    "stage, sp, scale",
    [(None, 2, 1.0), (0, 2, 0.5), (1, 2, 0.5), (2, 4, 0.25), (3, 2, 1.0), (2, 1, 1.0)],
)
def test_sp_gradient_scale_undoes_the_zero012_sum(stage, sp, scale):
    """The SP loss's backward factor (DeepSpeed #5248, #5555): 1/sp under ZeRO 0-2, which sum the SP ranks'
    gradients; 1 under ZeRO-3 (its reduce-scatter averages), for a plain module (None) and without SP."""
    engine = types.SimpleNamespace() if stage is None else types.SimpleNamespace(zero_optimization_stage=lambda: stage)
    assert compat.sp_gradient_scale(engine, sp) == scale


def test_a_private_attribute_that_disappeared_names_the_workaround():
    name = next(iter(compat.WORKAROUNDS))
    with pytest.raises(RuntimeError, match=f"SimpleNamespace._gone is gone in .*dsrecipes.compat.{name}"):
        compat._private(types.SimpleNamespace(), "_gone", name)
    assert compat._private(types.SimpleNamespace(_here=3), "_here", name) == 3


@pytest.mark.parametrize(
    "env, alone",
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"}, True),  # accelerate's simple launcher, N > 1
        ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500", "WORLD_SIZE": "2"}, False),  # torchrun
        ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500", "OMPI_COMM_WORLD_SIZE": "2"}, False),  # mpirun
        ({"ACCELERATE_USE_CPU": "True"}, False),  # cpu_1proc.yaml: one process asked, one started
        ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "1", "ACCELERATE_USE_DEEPSPEED": "true"}, False),
        ({"MASTER_PORT": "29500"}, False),  # not a CPU launch
    ],
)
def test_multi_cpu_started_alone_is_told_from_the_launchers_environment(monkeypatch, env, alone):
    for key in (
        "ACCELERATE_USE_CPU",
        "ACCELERATE_USE_DEEPSPEED",
        "MASTER_PORT",
        "WORLD_SIZE",
        "PMI_SIZE",
        "OMPI_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_SIZE",
        "PMIX_RANK",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert compat.multi_cpu_launched_alone() is alone


def test_the_report_lists_every_workaround():
    out = subprocess.run(
        [sys.executable, "-m", "dsrecipes.compat"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name, w in compat.WORKAROUNDS.items():
        assert re.search(rf"^ok\s+{name}\s+{w.package} {re.escape(w.verified)}", out, re.M), (name, out)


UNIVERSAL_SCRIPT = """
import json, subprocess, sys, torch, deepspeed
from dsrecipes import compat

stage, tmp = int(sys.argv[1]), sys.argv[2]
def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
    ]
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
    return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=cfg)[0]
def step(e):
    loss = torch.nn.functional.mse_loss(e(x), y)
    e.backward(loss)
    e.step()
    return loss.item()
x, y = torch.randn(4, 16), torch.randn(4, 4)
first = engine()
for _ in range(3):
    step(first)
first.save_checkpoint(tmp, tag="t")
subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", f"{tmp}/t",
                "--output_folder", f"{tmp}/u", "--inject_missing_state", "--num_extract_workers", "1"],
               check=True, capture_output=True)
second = engine()
with compat.load_universal_for_this_load(second, f"{tmp}/u"):
    second.load_checkpoint(tmp, tag="u")
print(json.dumps({
    "flag_after": second._config.load_universal_checkpoint,
    "first": [step(first) for _ in range(3)],
    "second": [step(second) for _ in range(3)],
    "weight_decay": [g["weight_decay"] for g in second.optimizer.optimizer.param_groups],
}), flush=True)
# gloo's threads must be joined before the interpreter exits, or libstdc++ aborts the process at exit
# ("terminate called without an active exception", exit -6; seen once in a clean clone's make test-fast)
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_a_universal_load_continues_exactly_with_two_param_groups(tmp_path, stage):
    """save -> ds_to_universal -> load with load_universal (dsrecipes.compat.load_universal_for_this_load): the next
    optimizer steps equal the uninterrupted engine's, with a decay and a no-decay group (under ZeRO-3, DeepSpeed
    0.19.8 alone shares one `step` tensor between the groups and gives both group 0's weight decay). A child
    process: a world of one with its own DeepSpeed groups."""
    import json

    from conftest import free_port

    script = tmp_path / "universal.py"
    script.write_text(UNIVERSAL_SCRIPT)
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run(
        [sys.executable, str(script), str(stage), str(tmp_path / "ckpt")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flag_after"] is False  # off again before any save (DeepSpeed #7546)
    assert out["first"] == out["second"]
    assert out["weight_decay"] == [0.1, 0.0]
