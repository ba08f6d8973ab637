"""dsrecipes.compat, the one module of library workarounds: every entry is verified against the pinned version,
guarded, and reported; the launch it refuses (MULTI_CPU started alone) is detected from the launcher's environment.

Run: .venv/bin/python -m pytest tests/test_workarounds.py -q      (seconds)
"""

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
    body = open(f"{ROOT}/src/dsrecipes/compat.py").read()
    for name in compat.WORKAROUNDS:
        assert body.count(f'"{name}"') >= 2 or name in used, f"{name} is listed but never guarded or used"


def test_a_newer_library_warns_once_with_the_issue_to_recheck(monkeypatch):
    name = next(iter(compat.WORKAROUNDS))
    w = compat.WORKAROUNDS[name]
    monkeypatch.setitem(compat.WORKAROUNDS, name, compat.Workaround(w.package, "0.0.1", w.issue, w.what))
    monkeypatch.setattr(compat, "_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compat.guard(name)
        compat.guard(name)
    msgs = [str(x.message) for x in seen if issubclass(x.category, compat.CompatWarning)]
    assert len(msgs) == 1 and f"dsrecipes.compat.{name} was written for {w.package} <= 0.0.1" in msgs[0]
    assert w.issue in msgs[0]


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
