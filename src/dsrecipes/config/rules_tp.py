"""The rule table's refusals for AutoTP training (axis tp).

Part of the one table in dsrecipes.config.rules (which imports TP_RULES); each Rule names its axes, its one-line
problem and fix, the config key it names, and the upstream issue it guards against.
"""

from __future__ import annotations

TP_RULES: tuple = ()
