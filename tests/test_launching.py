"""The one launcher shared by tests/ and benchmarks/ (dsrecipes.launching): command lines, environment, failures.

Run: .venv/bin/python -m pytest tests/test_launching.py -q     (about a second; the launches themselves are
exercised by every recipe test)
"""

from __future__ import annotations

import socket
import sys

import pytest

from dsrecipes import launching


def test_launch_cmd_uses_a_free_port_and_one_thread_per_rank():
    cmd = launching.launch_cmd("recipes/train_lm.py", ["--max_steps", "2"], deepspeed="ds.json", num_processes=2)
    assert cmd[:4] == [launching.ACCELERATE, "launch", "--config_file", launching.DS_YAML]
    port = int(cmd[cmd.index("--main_process_port") + 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free: nothing holds the port it handed out
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "1"
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == "ds.json" and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-3:] == ["recipes/train_lm.py", "--max_steps", "2"]  # launcher flags first, then the script's
    plain = launching.launch_cmd("x.py", [], accelerate_config="configs/accelerate/cpu_1proc.yaml")
    assert "--deepspeed_config_file" not in plain and "--num_processes" not in plain
    assert plain[plain.index("--config_file") + 1] == "configs/accelerate/cpu_1proc.yaml"
    tr = launching.torchrun_cmd(2)
    assert tr[:3] == [launching.TORCHRUN, "--nproc_per_node", "2"] and int(tr[tr.index("--master_port") + 1]) > 0


def test_child_env_is_offline_single_threaded_and_takes_extras():
    env = launching.child_env(FOO=3, OMP_NUM_THREADS=2)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert env["FOO"] == "3" and env["OMP_NUM_THREADS"] == "2"  # extras win, as strings
    assert env["PATH"].split(":")[0] == launching.BIN  # the venv's ninja builds DeepSpeed ops


def test_run_raises_with_the_stderr_tail_and_check_false_returns():
    bad = [sys.executable, "-c", "import sys; print('the reason', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(launching.LaunchError, match="exited 3") as exc:
        launching.run(bad, timeout=60)
    assert "the reason" in str(exc.value)
    assert launching.run(bad, timeout=60, check=False).returncode == 3
    ok = launching.run([sys.executable, "-c", "import os; print(os.getcwd(), os.environ['X'])"], timeout=60, X="y")
    assert ok.stdout.split() == [launching.ROOT, "y"]  # from the repository root, with the extra variable
