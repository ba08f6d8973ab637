"""Recipe arguments: HfArgumentParser dataclasses filled from a YAML file plus CLI overrides.

    args = parse_args(RECIPES["train_lm"], argv)     # argv like ["--config", "x.yaml", "--max_steps", "10"]

The YAML gives values, `--key value` flags override them, and an unknown key in either is an error.
Every field of every recipe lives in dsrecipes.config.fields (re-exported here), and RECIPES below names each
recipe's dataclasses, so that `dsrecipes check --recipe R.yaml` can validate any recipe config without importing
the recipe script.
"""

import argparse
import dataclasses
import difflib
import os
import re
import typing

import yaml

from dsrecipes.config.errors import ConfigError
from dsrecipes.config.fields import (  # noqa: F401  (re-exported: recipes and tests import them from here)
    DataArguments,
    DistillArguments,
    ModelArguments,
    PipelineArguments,
    ServeArguments,
    TrainArguments,
)
from dsrecipes.config.fields_lora import LoraArguments
from dsrecipes.config.fields_parallel import ParallelArguments
from dsrecipes.config.fields_sft import SftArguments  # noqa: F401  (re-exported)
from dsrecipes.config.limits import CHOICES_FROM, LIMITS, check_range, float_hint  # noqa: F401

RECIPES: dict[str, tuple[type, ...]] = {
    "train_lm": (ModelArguments, DataArguments, TrainArguments, LoraArguments, ParallelArguments),
    "train_pipeline": (ModelArguments, DataArguments, TrainArguments, PipelineArguments),
    "distill": (ModelArguments, DataArguments, TrainArguments, DistillArguments),
    "serve": (ServeArguments,),
    "sft": (ModelArguments, DataArguments, TrainArguments, SftArguments, LoraArguments, ParallelArguments),
}


def register(name: str, dataclass_types: tuple[type, ...]) -> None:
    RECIPES[name] = dataclass_types


def field_names(dataclass_types) -> set[str]:
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc)}


def _base_type(tp):
    """int for Optional[int], list for list[str], etc."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else tp
    return origin or tp


def validate_values(values: dict, dataclass_types, where: str) -> None:
    """Unknown keys, wrong types (a string "8" where a number goes), out-of-range values and unknown choices are
    errors, one line each."""
    fields = {f.name: f for dc in dataclass_types for f in dataclasses.fields(dc)}
    for key, value in values.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.75)
            hint = f"did you mean one of {near}?" if near else f"valid keys: {sorted(fields)}"
            raise ConfigError(where, key, "unknown key", f"remove it or fix the spelling ({hint})")
        f = fields[key]
        want = _base_type(f.type)
        if value is None:
            continue
        if want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(
                where,
                key,
                f"expected a number, got {type(value).__name__} {value!r}",
                float_hint(key, value) if want is float else f"write it unquoted, e.g. {key}: 8",
            )
        if want is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(where, key, f"expected an integer, got {value!r}", "write a whole number")
        if want is bool and not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true/false, got {value!r}", "write true or false")
        if want is str and not isinstance(value, str):
            raise ConfigError(where, key, f"expected a string, got {value!r}", "quote the value")
        if want is list and not isinstance(value, list):
            raise ConfigError(where, key, f"expected a list, got {value!r}", f"write {key}: [a, b]")
        choices = f.metadata.get("choices") or (CHOICES_FROM[key]() if key in CHOICES_FROM else None)
        if choices and value not in choices:
            raise ConfigError(where, key, f"{value!r} is not one of {choices}", "pick one of those")
        check_range(key, value, where)


# The exponent floats YAML 1.2 has and YAML 1.1 lacks (1.1 wants a dot and a signed exponent): 3e-4, 1e5, 3.0e4.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
FLOAT_FIRST = list("-+.0123456789")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 exponent floats: PyYAML follows YAML 1.1, where a float needs a dot and a
    signed exponent, so `3e-4`, `1e5` and `3.0e4` come back as strings. Only plain (unquoted) scalars are resolved:
    a quoted "3e-4" stays a string and gets the one-line type error. Integers keep YAML 1.1's resolver (tried first)."""


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, FLOAT_FIRST)


def load_yaml(path: str, yaml12_floats: bool = True) -> dict:
    """A recipe YAML as a dict. yaml12_floats=False reads it as PyYAML's safe_load does (YAML 1.1): what accelerate
    itself sees in an accelerate config file."""
    if not os.path.isfile(path):
        raise ConfigError(path, "--config", "file not found", "pass an existing YAML file (see configs/recipes/)")
    try:
        with open(path) as fh:
            values = yaml.load(fh, Loader=RecipeLoader if yaml12_floats else yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            path, "-", f"invalid YAML{pos} ({getattr(exc, 'problem', exc)})", "fix the YAML syntax"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(path, "-", "top level must be a mapping of key: value", "write one `key: value` per line")
    return values


def parse_args(dataclass_types, argv=None, validate=None):
    """YAML (--config) plus CLI overrides -> one merged namespace object with every field as attribute.

    Returns (namespace, config_path). `validate(ns, where)` may raise ConfigError for cross-field checks.
    A bad value raises ConfigError (on every rank; exit_on_config_error prints it once, on rank 0).
    """
    return _parse_args(dataclass_types, argv)


def _parse_args(dataclass_types, argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values = load_yaml(known.config) if known.config else {}
    validate_values(values, dataclass_types, known.config or "<cli>")

    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="Recipe YAML; its keys are the fields below.")
    parser.set_defaults(**values)
    ns, remaining = parser.parse_known_args(rest)
    if remaining:
        bad = next((r for r in remaining if r.startswith("--")), remaining[0])
        raise ConfigError("<cli>", bad, "unknown argument", "run the recipe with --help to list the valid flags")
    merged = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k != "config"})
    for key, value in vars(merged).items():  # CLI overrides get the same ranges and choices as the YAML
        if key not in values or values[key] != value:
            validate_values({key: value}, dataclass_types, "<cli>")
    return merged, known.config


def as_dict(ns) -> dict:
    return dict(vars(ns))


def recipe_main(name: str):
    """A recipe's entry point: `@recipe_main("train_lm") def main(args, where)` becomes `main(argv)`, which parses
    argv (YAML + CLI) into RECIPES[name] and turns any ConfigError into one printed line and exit code 2. `where` is
    the recipe YAML's path (or "<cli>"), the FILE of the recipe's own one-line errors."""
    import functools

    from dsrecipes.config.errors import exit_on_config_error

    def wrap(body):
        @exit_on_config_error
        @functools.wraps(body)
        def main(argv=None):
            args, config_path = parse_args(RECIPES[name], argv)
            return body(args, config_path or "<cli>")

        return main

    return wrap
