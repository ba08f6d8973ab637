"""The `dsrecipes` command: check (config linter), compat, plan (memory planner), loadgen (serving load generator),
checkpoint (inspect, convert, export).

compat writes docs/compat.md, which techniques combine.

    dsrecipes check --accelerate A.yaml --deepspeed D.json --recipe R.yaml
    dsrecipes compat [--check]
    dsrecipes plan --model configs/models/gpt2_small.json --zero 3 --gpus 8 --gpu A100-80GB
    dsrecipes loadgen --url http://127.0.0.1:8000 --concurrency 1 4 16
    dsrecipes checkpoint inspect|convert|export outputs/train_lm [OUT]

Each subcommand lives in its own module exposing add_arguments(parser) and run(namespace) -> exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsrecipes.config.errors import ConfigError, ConfigErrors

COMMANDS = {
    "check": ("dsrecipes.config.check", "lint accelerate/DeepSpeed/recipe configs"),
    "compat": ("dsrecipes.config.compat_doc", "write docs/compat.md (which techniques combine) from the rule table"),
    "plan": ("dsrecipes.memory.planner_cli", "predict per-GPU training memory and what makes a run fit"),
    "loadgen": ("dsrecipes.serve.loadgen", "drive a running dsrecipes server and report latency/throughput"),
    "checkpoint": ("dsrecipes.train.checkpoint_cli", "inspect, convert (universal) or export (HF) a checkpoint"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsrecipes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / the error, exits 2
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"dsrecipes {argv[0]}", description=module.__doc__.splitlines()[0])
    module.add_arguments(cmd_parser)
    ns = cmd_parser.parse_args(argv[1:])
    try:
        code = module.run(ns)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err.line(), file=sys.stderr)
        code = 2
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
