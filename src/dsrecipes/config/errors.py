"""One-line configuration errors: `error: FILE: KEY: what is wrong; how to fix it`.

Used by every recipe and by `dsrecipes check`. `exit_on_config_error` turns a ConfigError raised anywhere
in a recipe's main() into that one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import functools
import os
import sys


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
    """Decorator for recipe main(): print each ConfigError as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        loud = os.environ.get("RANK", "0") == "0"  # launched: every rank fails alike, rank 0 says so once
        try:
            return fn(*args, **kwargs)
        except ConfigErrors as exc:
            for err in exc.errors if loud else []:
                print(err.line(), file=sys.stderr, flush=True)
        except ConfigError as exc:
            if loud:
                print(exc.line(), file=sys.stderr, flush=True)
        sys.exit(2)

    return wrapper
