"""`dsrecipes check`: lint accelerate YAML + DeepSpeed JSON + recipe YAML together, before any GPU is rented.

    dsrecipes check --accelerate A.yaml --deepspeed D.json --recipe R.yaml    (any subset)
    dsrecipes check --all                                                     (every shipped config)
    dsrecipes check --accelerate A.yaml --recipe R.yaml -- --max_steps 10     (recipe flags, as the launch gets them)

Each problem prints as `error: FILE: KEY: what is wrong; how to fix it`; exit code 2 if any. Recipes call
`check_run()` at start-up with the values they actually got, so a bad launch fails in seconds.
Catches the pitfalls users report (see docs): a value set in two places, "auto" with nothing to fill it,
numbers as strings, batch arithmetic and unknown keys (per file: lint.py), and every combination of techniques
that the rule table (rules.py) refuses: `pipeline` through accelerate, ZeRO-3 + frozen params + reentrant
checkpointing, offload with an optimizer it cannot offload, cpu_checkpointing on CPU, ... (docs/compat.md).
"""

from __future__ import annotations

import glob
import os
import sys

from dsrecipes.config import args as recipe_args
from dsrecipes.config import rules, validate
from dsrecipes.config.deepspeed import FILLED_AUTO  # noqa: F401  (re-exported)
from dsrecipes.config.errors import ConfigError, ConfigErrors  # noqa: F401  (recipes use check.ConfigError)
from dsrecipes.config.lint import (  # noqa: F401  (re-exported: recipes and tests import them from here)
    _get,
    _num,
    lint_accelerate,
    lint_deepspeed,
    lint_recipe,
    load_json,
    recipe_for,
)

RECIPE_KINDS = {"train_lm": "train_lm", "distill": "distill", "train_pipeline": "pipeline"}


# ----------------------------------------------------------------------------- across files
def cross_check(
    recipe: dict,
    ds: dict | None,
    acc: dict | None,
    world_size: int | None,
    rpath: str,
    dpath: str,
    apath: str,
    on_cpu: bool | None = None,
    recipe_kind: str | None = None,
) -> list[ConfigError]:
    """Checks that need several sources, then the rule table. `recipe` holds the recipe's values (YAML keys or
    parsed args); recipe_kind (train_lm | distill | pipeline) defaults to the recipe whose fields fit them best."""
    errs = []
    ds = ds or {}
    acc = acc or {}
    pairs = [
        ("per_device_train_batch_size", "train_micro_batch_size_per_gpu"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("max_grad_norm", "gradient_clipping"),
        ("learning_rate", "optimizer.params.lr"),
        ("weight_decay", "optimizer.params.weight_decay"),
    ]
    for rkey, dkey in pairs:
        rv, dv = recipe.get(rkey), _get(ds, dkey)
        if _num(rv) is not None and _num(dv) is not None and float(rv) != float(dv):
            errs.append(
                ConfigError(
                    dpath,
                    dkey,
                    f"{dv} here but {rkey}={rv} in {rpath}",
                    f'set it in one place: write "auto" here and keep {rkey} in the recipe',
                )
            )
    mp = acc.get("mixed_precision")
    for prec in ("bf16", "fp16"):
        enabled = _get(ds, f"{prec}.enabled")
        if isinstance(enabled, bool) and mp is not None and enabled != (mp == prec):
            errs.append(
                ConfigError(
                    dpath,
                    f"{prec}.enabled",
                    f"{enabled} here but mixed_precision={mp!r} in {apath}",
                    'write "auto" here so mixed_precision decides',
                )
            )
    world = world_size or _num(acc.get("num_processes"))
    micro = _num(ds.get("train_micro_batch_size_per_gpu")) or _num(recipe.get("per_device_train_batch_size"))
    ga = _num(ds.get("gradient_accumulation_steps")) or _num(recipe.get("gradient_accumulation_steps"))
    total = _num(ds.get("train_batch_size"))
    if total and micro and ga and world and total != micro * ga * world:
        errs.append(
            ConfigError(
                dpath,
                "train_batch_size",
                f"{total} != micro {micro} x accumulation {ga} x world size {world} = {micro * ga * world}",
                'write "auto" or the product',
            )
        )
    if recipe_kind is None:
        recipe_kind = RECIPE_KINDS.get(recipe_for(recipe), recipe_for(recipe)) if recipe else "train_lm"
    settings = rules.settings_from(recipe, ds, acc, world, on_cpu, recipe_kind)
    errs += rules.refusals(settings, {"recipe": rpath, "deepspeed": dpath})
    from dsrecipes.train.elastic import check_resume  # light: no torch at import

    stage = _get(ds, "zero_optimization.stage") if ds else None
    values = {"output_dir": _default(recipe, "output_dir"), **recipe}
    if recipe_kind == "pipeline":  # `world` is its data-parallel size; EngineRun.load checks the processes itself
        return errs
    return errs + check_resume(values, _num(stage) if ds else None, world, rpath)


def _default(recipe: dict, key: str):
    """The recipe's default for `key` (recipe YAML leaves most keys out)."""
    import dataclasses

    for dc in recipe_args.RECIPES.get(recipe_for(recipe) if recipe else "train_lm", ()):
        for f in dataclasses.fields(dc):
            if f.name == key:
                return f.default
    return None


# ----------------------------------------------------------------------------- entry points
def override_values(rec: dict, flags: list[str]) -> dict:
    """The values that recipe flags (`--key value`, as a launch passes them after the script) set, parsed and
    checked the way the recipe will parse them. Raises ConfigError for an unknown flag or a bad value."""
    ns, _ = recipe_args.parse_args(recipe_args.RECIPES[recipe_for(rec)], list(flags))
    keys = [f[2:].split("=", 1)[0] for f in flags if f.startswith("--")]
    return {k: getattr(ns, k) for k in keys if hasattr(ns, k)}


def lint_files(
    accelerate: str | None = None,
    deepspeed: str | None = None,
    recipe: str | None = None,
    recipe_flags: list[str] | None = None,
) -> list[ConfigError]:
    errs: list[ConfigError] = []
    acc = ds = rec = None
    try:
        if accelerate:
            acc = recipe_args.load_yaml(accelerate, yaml12_floats=False)  # what accelerate reads
            errs += lint_accelerate(acc, accelerate)
            acc_ds = acc.get("deepspeed_config")
            deepspeed = deepspeed or (acc_ds.get("deepspeed_config_file") if isinstance(acc_ds, dict) else None)
        if deepspeed:
            ds = load_json(deepspeed)
            ds_errs = lint_deepspeed(ds, deepspeed)
            errs += ds_errs
            if validate.shape_errors(ds, deepspeed):  # sections that are not objects: no cross-file checks
                ds = None
        if recipe:
            rec = recipe_args.load_yaml(recipe)
            rec_errs = lint_recipe(rec, recipe)
            errs += rec_errs
            if recipe_flags and not rec_errs:
                rec = {**rec, **override_values(rec, recipe_flags)}
    except ConfigError as exc:
        return errs + [exc]
    on_cpu = bool(acc.get("use_cpu")) if acc else None
    errs += cross_check(
        rec or {}, ds, acc, None, recipe or "<recipe>", deepspeed or "<deepspeed>", accelerate or "<accelerate>", on_cpu
    )
    return errs


def check_run(accelerator, args, config_path: str | None) -> None:
    """Start-up check inside a recipe: the same rules, on the values this run really has."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    errs: list[ConfigError] = []
    ds, dpath = None, "<deepspeed>"
    if plugin is not None:
        dpath = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "<deepspeed>"
        ds = plugin.deepspeed_config
        errs += lint_deepspeed(ds, dpath)
        from dsrecipes.config.nvme import check_nvme_machine

        errs += check_nvme_machine(ds, accelerator.device.type == "cpu", dpath)
    acc = {"mixed_precision": accelerator.mixed_precision}
    errs += cross_check(
        vars(args),
        ds,
        acc,
        accelerator.num_processes,
        config_path or "<cli>",
        dpath,
        "<accelerate launch>",
        on_cpu=accelerator.device.type == "cpu",
    )
    if errs:
        raise ConfigErrors(errs)  # every rank; exit_on_config_error prints the lines once, on rank 0


def shipped_configs(root: str = "configs") -> list[tuple[str | None, str | None, str | None]]:
    out = [(a, None, None) for a in sorted(glob.glob(f"{root}/accelerate/*.yaml"))]
    out += [(None, d, None) for d in sorted(glob.glob(f"{root}/deepspeed/*.json"))]
    out += [(None, None, r) for r in sorted(glob.glob(f"{root}/recipes/*.yaml"))]
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--accelerate", help="accelerate config YAML")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (default: the one the accelerate YAML names)")
    parser.add_argument("--recipe", help="recipe config YAML")
    parser.add_argument("--all", action="store_true", help="lint every shipped config under configs/")
    parser.add_argument(
        "recipe_flags",
        nargs="*",
        metavar="-- FLAG",
        help="recipe flags as the launch passes them, after `--` (e.g. -- --max_steps 10): checked like the YAML",
    )


def run(ns) -> int:
    flags = getattr(ns, "recipe_flags", None) or []
    if flags and not ns.recipe:
        print("error: <cli>: -- FLAGS: recipe flags need --recipe; pass the recipe YAML too", file=sys.stderr)
        return 2
    combos = shipped_configs() if ns.all else [(ns.accelerate, ns.deepspeed, ns.recipe, flags)]
    if not any(any(c) for c in combos):
        print("error: <cli>: -: nothing to check; pass --accelerate, --deepspeed, --recipe or --all", file=sys.stderr)
        return 2
    errs = [e for combo in combos for e in lint_files(*combo)]
    for e in errs:
        print(e.line(), file=sys.stderr)
    if not errs:
        print(f"ok: {sum(1 for c in combos for x in c[:3] if x)} file(s) checked, no problems")
    return 2 if errs else 0
