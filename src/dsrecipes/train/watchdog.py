"""No orphaned ranks: a rank whose launcher died exits within about a second, without writing anything more.

    watchdog.start()      # idempotent; StopFlag() and Session() both call it, so every recipe has it from start-up
    watchdog.orphaned()   # True once the launcher that started this process is gone

Why: `kill -9` on `accelerate launch` (or torchrun, or the deepspeed launcher) used to leave both ranks training,
and writing checkpoints into output_dir, with nobody left to collect them. Two mechanisms, both cheap:

- Linux: prctl(PR_SET_PDEATHSIG, SIGTERM), so the kernel signals the rank when its parent dies. StopFlag's handler
  sees orphaned() and exits at once instead of asking for a preemption checkpoint. (PDEATHSIG fires on the death
  of the parent *thread*; torch elastic and the deepspeed launcher start ranks from their main thread, and a
  SIGTERM while the parent is still alive is treated as the ordinary preemption request.)
- Everywhere: a daemon thread polls os.getppid() every second; a new parent (init or a subreaper) means the
  launcher died. It works even while the main thread is inside a long C call.

What an orphan does, by design: os._exit(ORPHAN_EXIT) straight away, with no checkpoint, no summary.json and no
lock release (atexit handlers do not run). The launcher is gone, so nothing would requeue the job or read what it
wrote; every checkpoint already written is complete (they are renamed into place atomically), a half-written one
is a .tmp-* directory that the next run deletes, and output_dir/.lock names a dead pid, which the next run takes
over (dsrecipes.train.lock). Resume with --resume_from latest.

Only a process started by a launcher is watched (LOCAL_RANK, set by torchrun / accelerate / deepspeed, or
ACCELERATE_USE_CPU, set by accelerate's single-process launcher): a plain `nohup python recipes/train_lm.py &`
must survive its shell. DSRECIPES_WATCHDOG=0 turns the watchdog off.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

ORPHAN_EXIT = 70  # nobody is left to read it; distinct from 0/1/2 in logs of a process supervisor
PR_SET_PDEATHSIG = 1
DISABLE_ENV = "DSRECIPES_WATCHDOG"
LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_USE_CPU")

_state: dict = {"ppid": None, "thread": None}
_lock = threading.Lock()


def wanted(environ=None) -> bool:
    """Watch this process? Only under a launcher, and unless DSRECIPES_WATCHDOG=0."""
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return any(k in environ for k in LAUNCHER_ENV)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the Linux kernel to send `sig` when the parent dies; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def orphaned() -> bool:
    """True once the parent recorded by start() is no longer this process's parent."""
    ppid = _state["ppid"]
    return ppid is not None and os.getppid() != ppid


def die(reason: str = "") -> None:
    """Exit now, writing nothing (no atexit handlers, no flushing of Python buffers into output_dir)."""
    try:
        os.write(
            2,
            f"dsrecipes: rank pid {os.getpid()}: launcher (pid {_state['ppid']}) is gone{reason}; exiting without "
            f"writing; resume with --resume_from latest\n".encode(),
        )
    except OSError:
        pass
    os._exit(ORPHAN_EXIT)


def _watch(ppid: int, interval: float) -> None:
    while True:
        if os.getppid() != ppid:
            die()
        time.sleep(interval)


def start(interval: float = 1.0, force: bool = False) -> bool:
    """Start watching (once per process). Returns True when the watchdog runs."""
    if not (force or wanted()):
        return False
    with _lock:
        thread = _state["thread"]
        if thread is not None and thread.is_alive():
            return True
        ppid = os.getppid()
        _state["ppid"] = ppid
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != ppid:  # the launcher died between the two reads, before prctl took effect
            die(" (during start-up)")
        thread = threading.Thread(target=_watch, args=(ppid, interval), name="dsrecipes-watchdog", daemon=True)
        thread.start()
        _state["thread"] = thread
    return True
