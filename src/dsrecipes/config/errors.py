"""One-line configuration errors: `error: FILE: KEY: what is wrong; how to fix it`.

Used by every recipe and by `dsrecipes check`. `exit_on_config_error` turns a ConfigError raised anywhere
in a recipe's main() into that one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time

# A rank other than 0 that hits the same error waits this long for the launcher to end it (torch elastic sends
# SIGTERM once rank 0 has exited 2), so that rank 0 prints the line and is named as the root cause. Exiting at once
# raced rank 0: the launcher could SIGTERM rank 0 before it printed, or name rank 1's exit (or a gloo SIGABRT at
# its teardown) as the failure. A rank still alive after the wait failed on its own, and prints its own lines.
QUIET_RANK_WAIT_S = 30.0


class ConfigError(Exception):
    """A bad input the user can fix. Carries the file, the key, the problem and the fix."""

    def __init__(self, where: str, key: str, problem: str, fix: str):
        self.where, self.key, self.problem, self.fix = where or "<cli>", key or "-", problem, fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"error: {self.where}: {self.key}: {self.problem}; {self.fix}"


class ConfigErrors(Exception):
    """Several ConfigErrors found in one pass (the linter reports them all)."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(e.line() for e in errors))


def exit_on_config_error(fn):
    """Decorator for recipe main(): print each ConfigError as one line and exit 2.

    Launched, every rank fails alike: rank 0 prints, the other ranks wait (QUIET_RANK_WAIT_S) to be ended."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigErrors as exc:
            lines = [err.line() for err in exc.errors]
        except ConfigError as exc:
            lines = [exc.line()]
        if os.environ.get("RANK", "0") != "0":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loop's preemption handler must not catch this one
            time.sleep(QUIET_RANK_WAIT_S)
        _leave_process_group()
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        sys.exit(2)

    return wrapper


def _leave_process_group():
    """Tear the process group down before exit, so that no peer sees a half-closed gloo connection."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting on a config error anyway; the one error line matters more
        pass
