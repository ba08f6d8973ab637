"""Faults a new user runs into: orphaned ranks, two runs writing one output_dir, Ctrl-C.

- The lock (dsrecipes.train.lock): refused while a live process holds it, taken over when stale (dead pid, reused
  pid, another host's lock not refreshed, unreadable), released only by its holder. Fast, in-process.
- The watchdog (dsrecipes.train.watchdog) and StopFlag: real processes whose parent is killed, real signals. Fast.
- Slow (2 ranks under accelerate launch): SIGKILL on the launcher alone ends both ranks and nothing in output_dir
  changes afterwards; a second run on a held output_dir is refused with one `error:` line; a third one takes the
  stale lock over and completes; Ctrl-C (SIGINT to the launcher's process group) checkpoints, summary.json says
  "preempted", and --resume_from latest reproduces the uninterrupted loss curve.

Run: .venv/bin/python -m pytest tests/test_faults.py -q   (-m "not slow" for the fast ones)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import PREEMPT_RUN, ROOT, TINY, child_env, launch_cmd, run, summary, train_curve
from dsrecipes.config.errors import ConfigError
from dsrecipes.train import lock as lockmod
from dsrecipes.train.lock import LOCK_NAME, RunLock, read_holder, stale_reason
from dsrecipes.train.watchdog import wanted

HOST = socket.gethostname()


# ---------------------------------------------------------------------------- the lock
def _write_lock(out, **holder):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    with open(path, "w") as fh:
        json.dump({"created": time.time(), **holder}, fh)
    return path


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_is_written_with_pid_and_host_and_released(tmp_path):
    out = str(tmp_path / "o")
    lock = RunLock(out)
    assert lock.acquire() is None
    holder = read_holder(os.path.join(out, LOCK_NAME))
    assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["started"] > 0
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # no temporary files left
    lock.release()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    lock.release()  # twice is harmless


def test_live_lock_on_this_host_is_refused_with_one_line(tmp_path, sleeper):
    out = str(tmp_path / "o")
    started = psutil.Process(sleeper.pid).create_time()
    path = _write_lock(out, pid=sleeper.pid, host=HOST, started=started)
    with pytest.raises(ConfigError) as exc:
        RunLock(out).acquire()
    line = exc.value.line()
    assert line.startswith(f"error: {path}: output_dir: held by a live run: pid {sleeper.pid} on {HOST}"), line
    assert "\n" not in line and "--output_dir" in line
    assert read_holder(path)["pid"] == sleeper.pid  # untouched


def test_dead_pid_lock_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = str(tmp_path / "o")
    path = _write_lock(out, pid=dead.pid, host=HOST, started=1.0)
    lock = RunLock(out)
    note = lock.acquire()
    assert note == f"note: took over the stale lock {path} (pid {dead.pid} on {HOST} is not running)"
    assert read_holder(path)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(path)


def test_reused_pid_counts_as_stale(sleeper, tmp_path):
    started = psutil.Process(sleeper.pid).create_time()
    assert stale_reason({"pid": sleeper.pid, "host": HOST, "started": started}, 0.0) is None
    reason = stale_reason({"pid": sleeper.pid, "host": HOST, "started": started - 100}, 0.0)
    assert reason == f"pid {sleeper.pid} on {HOST} is now another process"


def test_other_hosts_lock_is_trusted_until_its_heartbeat_is_old(tmp_path):
    out = str(tmp_path / "o")
    path = _write_lock(out, pid=12345, host="node-elsewhere", started=1.0)
    with pytest.raises(ConfigError, match="pid 12345 on node-elsewhere"):
        RunLock(out).acquire()
    old = time.time() - lockmod.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = RunLock(out)
    note = lock.acquire()
    assert "not refreshed for" in note and "pid 12345 on node-elsewhere" in note, note
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    out = str(tmp_path / "o")
    lock = RunLock(out, heartbeat_s=0.05)
    lock.acquire()
    path = os.path.join(out, LOCK_NAME)
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 5
    while time.time() < deadline and os.path.getmtime(path) < old + 10:
        time.sleep(0.05)
    assert os.path.getmtime(path) > time.time() - 10
    lock.release()


def test_unreadable_lock_is_stale_and_release_leaves_a_successors_lock(tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    path = os.path.join(out, LOCK_NAME)
    with open(path, "w") as fh:
        fh.write("{half")
    lock = RunLock(out)
    assert lock.acquire() == f"note: took over the stale lock {path} (unreadable)"
    _write_lock(out, pid=12345, host="node-elsewhere", started=1.0)  # as if another run took it over
    lock.release()
    assert read_holder(path)["host"] == "node-elsewhere"


def test_same_process_keeps_its_own_lock(tmp_path):
    out = str(tmp_path / "o")
    first = RunLock(out)
    first.acquire()
    assert RunLock(out).acquire() is None  # in-process callers (tests) may open several Sessions on one directory
    first.release()


# ---------------------------------------------------------------------------- watchdog and signals (real processes)
def test_watchdog_only_under_a_launcher():
    assert not wanted({})
    assert wanted({"LOCAL_RANK": "0"}) and wanted({"ACCELERATE_USE_CPU": "False"})
    assert not wanted({"LOCAL_RANK": "0", "DSRECIPES_WATCHDOG": "0"})


CHILD = """
import os, sys, time
from dsrecipes.train.checkpoints import StopFlag
stop = StopFlag()  # starts the watchdog (LOCAL_RANK is set)
with open(sys.argv[1], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
while True:  # a rank that would write forever
    with open(sys.argv[1], "a") as fh:
        fh.write("tick\\n")
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("sleep", ["0.05", "30"], ids=["busy", "blocked-in-sleep"])
def test_orphaned_rank_exits_and_stops_writing(tmp_path, sleep):
    log = str(tmp_path / "ticks")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {CHILD!r}, {log!r}, {sleep!r}]);"
    parent += " time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=child_env(LOCAL_RANK="0"))
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(log) and "tick" in open(log).read()):
        time.sleep(0.05)
    child = psutil.Process(int(open(log).readline()))
    assert child.ppid() == proc.pid
    proc.kill()
    proc.wait()
    t0 = time.time()
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert not alive, "the orphan kept running"
    assert time.time() - t0 < 5
    size = os.path.getsize(log)
    time.sleep(0.5)
    assert os.path.getsize(log) == size


def test_stopflag_catches_sigint_sigterm_sigusr1():
    code = textwrap.dedent(
        """
        import os, signal
        from dsrecipes.train.checkpoints import StopFlag
        stop = StopFlag()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            stop.signum = 0
            os.kill(os.getpid(), s)
            assert stop.signum == s, (s, stop.signum)
        print("ok")
        """
    )
    proc = run([sys.executable, "-c", code], timeout=60)
    assert proc.stdout.strip() == "ok" and "KeyboardInterrupt" not in proc.stderr


# ---------------------------------------------------------------------------- 2 ranks under accelerate launch
ARGS = ["--config", TINY, "--generated_docs", "200", "--eval_docs", "20", "--report_to", "none", "--logging_steps", "1"]


def _start(out, *extra, args=ARGS, deepspeed=None):
    """The launcher in a new session (its own process group); output to files (a full pipe would block the ranks)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = launch_cmd("recipes/train_lm.py", args + ["--output_dir", out, *extra], deepspeed=deepspeed)
    logs = open(out + ".stdout", "w"), open(out + ".stderr", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=logs[0], stderr=logs[1], start_new_session=True)
    for fh in logs:
        fh.close()
    return proc


def _output(out):
    return open(out + ".stdout").read(), open(out + ".stderr").read()


def _wait_training(proc, out, timeout=300):
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, _output(out)[1][-3000:]
        time.sleep(0.05)
    assert os.path.getsize(metrics) > 0
    kids = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in kids if "recipes/train_lm.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2, ranks
    return ranks


def _snapshot(out):
    snap = {}
    for d, _, files in os.walk(out):
        for f in files:
            st = os.stat(os.path.join(d, f))
            snap[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.mark.slow
def test_kill9_launcher_ends_ranks_second_run_refused_third_takes_over(tmp_path):
    out = str(tmp_path / "run")
    first, ranks = _start(out, "--max_steps", "3000", "--save_steps", "5", "--eval_steps", "1000"), []
    try:
        ranks = _wait_training(first, out)
        holder = read_holder(os.path.join(out, LOCK_NAME))
        assert holder["pid"] in [p.pid for p in ranks] and holder["host"] == HOST

        # a second run on the held output_dir: one error line naming the lock, the holder pid and host
        lines = len(open(os.path.join(out, "metrics.jsonl")).readlines())
        second = run(
            [sys.executable, "recipes/train_lm.py", *ARGS, "--output_dir", out, "--max_steps", "5"],
            check=False,
            timeout=300,
        )
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert f"{out}/{LOCK_NAME}: output_dir: held by a live run: pid {holder['pid']} on {HOST}" in errors[0]
        assert "Traceback" not in second.stderr
        assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) >= lines  # the live run's log untouched
        # the same under accelerate launch with 2 ranks: rank 0 prints the line, rank 1 leaves silently; the
        # launcher exits 1 (torch elastic's ChildFailedError), the ranks 2
        second = run(launch_cmd("recipes/train_lm.py", ARGS + ["--output_dir", out]), check=False, timeout=300)
        errors = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.startswith("error:")]
        assert second.returncode != 0 and len(errors) == 1, second.stderr[-3000:]
        assert f"held by a live run: pid {holder['pid']} on {HOST}" in errors[0] and "exitcode  : 2" in second.stderr
        assert first.poll() is None

        # SIGKILL the launcher only (not its group): both ranks must go, and stop writing
        first.kill()
        first.wait(30)
        t0 = time.time()
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks still running 10 s after the launcher died: {alive}"
        gone_after = time.time() - t0
        before = _snapshot(out)
        time.sleep(3)
        assert _snapshot(out) == before, "files in output_dir changed after the ranks were gone"
    finally:  # on a failure, leave no process behind
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        for p in ranks:
            if p.is_running():
                p.kill()

    # the lock names a dead pid: the next run takes it over, says so, completes and releases it
    third = run(launch_cmd("recipes/train_lm.py", ARGS + ["--output_dir", out, "--max_steps", "6"]), timeout=600)
    assert f"note: took over the stale lock {out}/{LOCK_NAME} (pid {holder['pid']} on {HOST} is not running)" in (
        third.stderr
    ), third.stderr[-3000:]
    assert summary(out)["status"] == "completed" and summary(out)["steps"] == 6
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    assert gone_after < 10


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_matches_straight_run(tmp_path, straight_preempt_run):
    # conftest.PREEMPT_RUN (2 ranks, ZeRO-2, 40 steps): its straight run is shared with tests/test_train_lm.py's
    # SIGUSR1 test, one launch fewer; the yaml's ZeRO-2 JSON is named explicitly, as there
    ds = "configs/deepspeed/zero2.json"
    straight = straight_preempt_run
    out = str(tmp_path / "interrupted")
    proc = _start(out, args=PREEMPT_RUN, deepspeed=ds)
    try:
        _wait_training(proc, out)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the whole foreground group
        proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout, stderr = _output(out)
    s = summary(out)
    assert s["status"] == "preempted" and 0 < s["steps"] < 40, (s, stderr[-3000:])
    assert "preempted at step" in stdout and "resume with --resume_from latest" in stdout
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "checkpoints", f"step_{s['steps']:08d}", "trainer_state.json"))
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released at the preempted exit
    # the launcher (torch elastic) re-raises the SIGINT it got as SignalException: exit code 1, not ours to set
    assert proc.returncode == 1, proc.returncode
    run(
        launch_cmd("recipes/train_lm.py", PREEMPT_RUN + ["--output_dir", out, "--resume_from", "latest"], deepspeed=ds),
        timeout=600,
    )
    assert train_curve(out) == train_curve(straight)
    assert summary(out)["status"] == "completed"
