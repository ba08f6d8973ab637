"""No two writers: output_dir/.lock names the run that owns an output directory.

    lock = RunLock(output_dir)
    note = lock.acquire()   # ConfigError (-> one `error:` line, exit 2) while a live run holds it;
                            # a str (one line to print) when it took over a stale lock; None otherwise
    lock.release()          # also registered with atexit: normal end, ConfigError, preemption

Session (dsrecipes.train.loop) takes it on the global rank 0 only, before anything in output_dir is written
(metrics.jsonl, checkpoints/, tensorboard/), and the other ranks leave with rank 0 when it is refused.

The file is JSON {"pid", "host", "started" (the holder's process start time), "created"}, written to a temporary
name and hard-linked into place, so it appears complete or not at all, and only one of two racing runs gets it.
When is a lock stale (taken over, with a one-line note)?
- same host: its pid is not running, or runs a different process (its start time differs: the pid was reused);
- another host (multi-node jobs, a shared filesystem): pid liveness cannot be checked from here, so the holder's
  rank 0 refreshes the file's mtime every HEARTBEAT_S seconds from a daemon thread, and a lock not refreshed for
  STALE_AFTER_S seconds counts as stale;
- unreadable (not JSON): stale.
A lock held by this very process (pid, host and start time match) is simply kept, so in-process callers (tests)
may open several Sessions on one directory. A run killed with SIGKILL, or an orphaned rank (dsrecipes.train.watchdog),
leaves its lock behind on purpose; the next run takes it over.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time

import psutil

from dsrecipes.config.errors import ConfigError

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}


def read_holder(path: str) -> dict | None:
    """The lock's JSON, {} when unreadable, None when there is no lock."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) and "pid" in data and "host" in data else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def stale_reason(holder: dict, age_s: float, host: str | None = None, stale_after_s: float = STALE_AFTER_S):
    """Why the lock of `holder` (whose file was last refreshed age_s ago) is stale, or None while it is live."""
    host = host or socket.gethostname()
    if not holder:
        return "unreadable"
    if holder["host"] != host:
        if age_s > stale_after_s:
            who = f"pid {holder['pid']} on {holder['host']}"
            return f"not refreshed for {age_s:.0f} s (> {stale_after_s:.0f} s) by {who}"
        return None
    pid = int(holder["pid"])
    started = _start_time(pid)
    try:
        running = started is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        running = started is not None
    if not running:
        return f"pid {pid} on {host} is not running"
    if holder.get("started") is not None and abs(started - float(holder["started"])) > 1.0:
        return f"pid {pid} on {host} is now another process"
    return None


def _same_process(holder: dict, mine: dict) -> bool:
    return bool(holder) and all(holder.get(k) == mine[k] for k in ("pid", "host", "started"))


class RunLock:
    def __init__(self, output_dir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, LOCK_NAME)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.held, self.mine = False, me()
        self._stop = threading.Event()

    def _refuse(self, holder: dict) -> ConfigError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("created", 0)))
        return ConfigError(
            self.path,
            "output_dir",
            f"held by a live run: pid {holder['pid']} on {holder['host']} (since {since})",
            "wait for it to finish or stop it, or pass another --output_dir",
        )

    def acquire(self) -> str | None:
        """Take the lock. Returns a one-line note when a stale lock was taken over; raises ConfigError if held."""
        os.makedirs(self.output_dir, exist_ok=True)
        note = None
        for _ in range(3):  # a racing run may take or drop it between our steps
            if self._link():
                self._hold()
                return note
            holder = read_holder(self.path)
            if holder is None:
                continue
            if _same_process(holder, self.mine):
                self._hold()
                return note
            try:
                age = time.time() - os.path.getmtime(self.path)
            except FileNotFoundError:
                continue
            reason = stale_reason(holder, age, self.mine["host"], self.stale_after_s)
            if reason is None:
                raise self._refuse(holder)
            aside = f"{self.path}.stale{os.getpid()}"
            try:
                os.rename(self.path, aside)  # only one of two racing runs moves it
            except FileNotFoundError:
                continue
            os.unlink(aside)
            note = f"note: took over the stale lock {self.path} ({reason})"
        holder = read_holder(self.path) or {"pid": "?", "host": "?"}
        raise self._refuse(holder)

    def _link(self) -> bool:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({**self.mine, "created": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _hold(self) -> None:
        if self.held:
            return
        self.held = True
        self._stop.clear()
        atexit.register(self.release)
        threading.Thread(target=self._beat, name="dsrecipes-lock-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if _same_process(read_holder(self.path) or {}, self.mine):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def release(self) -> None:
        """Remove the lock if this process still holds it (another run may have taken it over as stale)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        atexit.unregister(self.release)
        if _same_process(read_holder(self.path) or {}, self.mine):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def lock_output_dir(acc, output_dir: str) -> RunLock | None:
    """Rank 0 takes output_dir/.lock; every rank learns whether it did (one collective). Refused: rank 0 raises the
    ConfigError (its one `error:` line), the other ranks raise one that exit_on_config_error keeps quiet. Returns the
    lock on rank 0, else None."""
    import sys

    import torch

    lock, error = (RunLock(output_dir) if acc.is_main_process else None), None
    if lock is not None:
        try:
            note = lock.acquire()
            if note:
                print(note, file=sys.stderr, flush=True)
        except ConfigError as exc:
            error = exc
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ok = torch.tensor([0.0 if error is not None else 1.0], device=getattr(acc, "device", "cpu"))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        refused = ok.item() < 1.0
    else:
        refused = error is not None
    if error is not None:
        raise error
    if refused:
        raise ConfigError(os.path.join(output_dir, LOCK_NAME), "output_dir", "refused on rank 0", "see rank 0's line")
    return lock
