"""The rule table's refusals for Ulysses sequence parallelism and ALST tiling (axes sp, tiling).

Part of the one table in dsrecipes.config.rules (which imports SP_RULES); each Rule names its axes, its one-line
problem and fix, the config key it names, and the upstream issue it guards against.
"""

from __future__ import annotations

SP_RULES: tuple = ()
