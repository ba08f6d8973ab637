"""Resume on another number of processes (elastic): DeepSpeed universal checkpoints, with the global batch kept.

    keep_global_batch(args, where)          # before the Accelerator: gradient_accumulation_steps for this world size
    world = world_facts(acc, args)          # written into every trainer_state.json ("world")
    plan = plan_resume(acc, path, state, where)     # None: same world size (the plain, exact resume)
    plan.translate(state)                   # the data position in this world's micro-batches
    plan.load(acc)                          # convert once (cached beside the checkpoint), load, RNG of new ranks
    to_universal(path)                      # the conversion alone (dsrecipes checkpoint convert)

A preempted SLURM job comes back on whatever nodes are free. DeepSpeed's own checkpoints hold ZeRO optimizer states
partitioned for the world size that wrote them, and loading them on another one fails (DeepSpeed #2898, #3810,
#6441). The universal format (`ds_to_universal`) stores each parameter's fp32 weight and Adam moments whole, and
`"checkpoint": {"load_universal": true}` re-partitions them at load. What this module adds around it:
- the global batch (micro-batch x accumulation x processes) stays the same, so the LR schedule, the data order and
  the optimizer's statistics mean what they meant: accumulation changes, or a one-line error says why it cannot;
- with that, each optimizer step sees the same samples as in the uninterrupted run (accelerate hands batch i of the
  seeded permutation to rank i % world), so the data position converts exactly;
- rank r < old world size gets rank r's RNG state back; a new rank starts a stream derived from (seed, step, rank);
- the conversion runs once on rank 0 into `<checkpoint>/universal` (atomically, via a temporary directory) and is
  reused; `load_universal` is on for that one load only (compat: DeepSpeed #7546, set at save time under ZeRO-3
  it writes only rank 0's model states), and `--inject_missing_state` supplies what accelerate's checkpoints lack
  (#5405); after a ZeRO-3 load each optimizer sub-group gets its own step counter and its own hyperparameters
  back (compat: DeepSpeed shares one step tensor and copies param_groups[0] onto every group).
ZeRO-0 is refused: the universal converter needs ZeRO partitions (DeepSpeed #7200).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import subprocess
import sys

from dsrecipes.config.errors import ConfigError

UNIVERSAL = "universal"  # <checkpoint>/universal: the converted copy, laid out like an accelerate checkpoint
ENGINE_TAG = "pytorch_model"  # accelerate's DeepSpeed tag inside a checkpoint directory


def world_facts(acc, args) -> dict:
    """What a checkpoint must record to be resumed elsewhere: processes, batch arithmetic, ZeRO stage, precision."""
    from dsrecipes.train.accelerator import zero_stage

    world = acc.num_processes
    b, ga = getattr(args, "per_device_train_batch_size", None), getattr(args, "gradient_accumulation_steps", 1)
    if b is None:  # a loop without batch arithmetic (tests that drive the loop by hand): nothing to keep
        return {"processes": world}
    b, ga = int(b), int(ga)
    return {
        "processes": world,
        "per_device_train_batch_size": b,
        "gradient_accumulation_steps": ga,
        "global_batch": b * ga * world,
        "zero_stage": zero_stage(acc) if hasattr(acc, "state") else getattr(acc, "zero_stage", None),
        "mixed_precision": str(getattr(acc, "mixed_precision", "no")),
    }


def saved_world(path: str, state: dict) -> dict:
    """The writer's world of a checkpoint; older checkpoints without "world" are read from their files."""
    if state.get("world"):
        return state["world"]
    ranks = len(glob.glob(os.path.join(path, "random_states_*.pkl")))
    return {"processes": ranks or None}


def accumulation_for(saved: dict, micro: int, now: int, where: str) -> int:
    """The gradient accumulation that keeps the checkpoint's global batch with `micro` per process on `now`
    processes, or a one-line refusal."""
    target = int(saved["global_batch"])
    if target % (micro * now):
        raise ConfigError(
            where,
            "gradient_accumulation_steps",
            f"the checkpoint's global batch {target} ({saved['per_device_train_batch_size']} x "
            f"{saved['gradient_accumulation_steps']} accumulation x {saved['processes']} processes) cannot be kept "
            f"with per_device_train_batch_size {micro} on {now} processes",
            _batch_fix(target, micro, now),
        )
    return target // (micro * now)


def _batch_fix(target: int, micro: int, now: int) -> str:
    fixes = []
    if target % micro == 0:
        fixes.append(f"resume on a number of processes that divides {target // micro}")
    if target % now == 0:
        fixes.append(f"set per_device_train_batch_size to a divisor of {target // now}")
    return " or ".join(fixes) or f"resume with per_device_train_batch_size x processes dividing {target}"


def stage_refusal(path: str, saved: dict, now: int, stage, where: str) -> ConfigError | None:
    """Universal checkpoints need ZeRO partitions on both sides (DeepSpeed #7200: not ZeRO-0)."""
    if saved.get("zero_stage") and stage:
        return None
    name = lambda s: "no ZeRO" if s is None else f"ZeRO-{s}"  # noqa: E731
    return ConfigError(
        where,
        "resume_from",
        f"{path} ({name(saved.get('zero_stage'))}) was written by {saved['processes']} processes and this run has "
        f"{now} on {name(stage)}: universal checkpoints need ZeRO 1-3 (DeepSpeed #7200)",
        f"resume with {saved['processes']} processes, or train with ZeRO-1/2/3 to resume on another world size",
    )


def written_elsewhere(output_dir: str, resume_from: str | None, now: int) -> tuple[str, dict] | None:
    """(checkpoint, its writer's world) when --resume_from names a checkpoint written with batch records by another
    number of processes than `now`; None otherwise (nothing to resume, the same world, an older checkpoint)."""
    from dsrecipes.train.checkpoints import find_checkpoint, read_state

    path = find_checkpoint(output_dir, resume_from) if resume_from else None
    if path is None:
        return None
    saved = saved_world(path, read_state(path))
    return None if not saved.get("global_batch") or saved["processes"] == now else (path, saved)


def check_resume(values: dict, stage, now: int | None, where: str) -> list[ConfigError]:
    """`dsrecipes check` and the start-up check: can --resume_from be resumed on `now` processes? [] when it can,
    when nothing is resumed, or when the world is unknown."""
    if not values.get("resume_from") or not now or not values.get("output_dir"):
        return []
    try:
        found = written_elsewhere(values["output_dir"], values["resume_from"], int(now))
    except ConfigError as exc:
        return [exc]
    if found is None:
        return []
    path, saved = found
    errs = []
    try:
        accumulation_for(saved, int(values.get("per_device_train_batch_size") or 1), int(now), where)
    except ConfigError as exc:
        errs.append(exc)
    refusal = stage_refusal(path, saved, int(now), stage, where)
    return errs + ([refusal] if refusal is not None else [])


def keep_global_batch(args, where: str) -> None:
    """Before the Accelerator exists: if --resume_from finds a checkpoint written by another number of processes, set
    gradient_accumulation_steps so that the global batch stays the one in the checkpoint, or refuse in one line."""
    now = int(os.environ.get("WORLD_SIZE", "1"))
    found = written_elsewhere(args.output_dir, args.resume_from, now)
    if found is None:
        return
    saved = found[1]
    ga = accumulation_for(saved, int(args.per_device_train_batch_size), now, where)
    if ga != args.gradient_accumulation_steps and os.environ.get("RANK", "0") == "0":
        print(
            f"elastic resume: {saved['processes']} -> {now} processes; gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps} -> {ga} keeps the global batch at {saved['global_batch']}",
            flush=True,
        )
    args.gradient_accumulation_steps = ga


@dataclasses.dataclass
class ElasticPlan:
    path: str  # the checkpoint
    old: dict  # its world_facts
    new: dict  # this run's
    seed: int
    step: int  # the checkpoint's optimizer step

    def translate(self, state: dict) -> dict:
        """The trainer state with its data position in this world's micro-batches: the same samples consumed."""
        old_b = self.old["per_device_train_batch_size"] * self.old["processes"]
        new_b = self.new["per_device_train_batch_size"] * self.new["processes"]
        return {**state, "batch_in_epoch": state.get("batch_in_epoch", 0) * old_b // new_b}

    def load(self, acc) -> dict:
        """Convert (once), then load model, optimizer, schedule, sampler and RNG with load_universal on. Returns the
        facts for summary.json: worlds, accumulation, where the universal copy is, a digest of rank 0's torch RNG."""
        import hashlib

        import torch

        from dsrecipes import compat

        universal = os.path.join(self.path, UNIVERSAL)
        cached = os.path.isdir(universal)
        if acc.is_main_process:
            to_universal(self.path)
            verb = "using the cached" if cached else "converted to a"
            print(
                f"elastic resume: {self.old['processes']} -> {self.new['processes']} processes, ZeRO-"
                f"{self.new['zero_stage']}: {verb} universal checkpoint in {universal}",
                flush=True,
            )
        acc.wait_for_everyone()
        engine = acc.deepspeed_engine_wrapped.engine
        with compat.load_universal_for_this_load(engine, os.path.join(universal, ENGINE_TAG)):
            acc.load_state(universal)
        # accelerate restores its micro-batch counter (it decides which micro-batch syncs) from the old world's RNG
        # file: count it in this world's accumulation, so the next optimizer step takes a whole window again.
        acc.step = self.step * self.new["gradient_accumulation_steps"]
        k = "gradient_accumulation_steps"
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
        if acc.process_index >= self.old["processes"]:  # a new rank: a stream of its own, the same on every rerun
            from accelerate.utils import set_seed

            set_seed(self.seed + 1_000_003 * (acc.process_index + 1) + self.step)
        return {
            "from_processes": self.old["processes"],
            "to_processes": self.new["processes"],
            "gradient_accumulation_steps": [self.old[k], self.new[k]],
            "global_batch": self.new["global_batch"],
            "universal": universal,
            "cached": cached,
            "rank0_torch_rng_sha1": rng,
        }


def plan_resume(acc, path: str | None, state: dict, args, where: str) -> ElasticPlan | None:
    """None when the checkpoint was written by this many processes; else how to resume it here, or a refusal."""
    if not path:
        return None
    old = saved_world(path, state)
    if old.get("processes") in (None, acc.num_processes):
        return None
    new = world_facts(acc, args)
    if not hasattr(acc, "deepspeed_engine_wrapped") or "zero_stage" not in old:
        raise ConfigError(
            where,
            "resume_from",
            f"{path} was written by {old['processes']} processes and this run has {acc.num_processes}; only the "
            "accelerate + DeepSpeed recipes resume on another world size (the pipeline's stages are fixed)",
            f"resume with {old['processes']} processes, or start fresh (drop --resume_from)",
        )
    refusal = stage_refusal(path, old, acc.num_processes, new["zero_stage"], where)
    if refusal is not None:
        raise refusal
    if new["global_batch"] != old["global_batch"]:  # keep_global_batch ran before the Accelerator, so this is a bug
        raise ConfigError(where, "gradient_accumulation_steps", f"global batch {new} != checkpoint's {old}", "")
    return ElasticPlan(path, old, new, int(args.seed), int(state.get("step", 0)))


def to_universal(path: str, quiet: bool = True) -> str:
    """<checkpoint>/universal: DeepSpeed's universal checkpoint of <checkpoint>/pytorch_model next to links to the
    checkpoint's accelerate files (schedule, sampler, RNG, trainer state). Converted once, atomically; reused."""
    out = os.path.join(path, UNIVERSAL)
    if os.path.isdir(out):
        return out
    engine_dir = os.path.join(path, ENGINE_TAG)
    if not os.path.isdir(engine_dir):
        raise ConfigError(path, ENGINE_TAG, "no DeepSpeed engine checkpoint here", "give an accelerate checkpoint")
    tmp = os.path.join(path, f".tmp-{UNIVERSAL}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", engine_dir]
    cmd += ["--output_folder", os.path.join(tmp, ENGINE_TAG), "--inject_missing_state"]  # #5405
    cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if quiet else ["see above"]
        raise ConfigError(path, ENGINE_TAG, f"ds_to_universal failed: {tail[0] if tail else proc.returncode}", "")
    for name in os.listdir(path):  # accelerate's own files, shared (hard links: no copy, pruned together)
        src = os.path.join(path, name)
        if os.path.isfile(src):
            try:
                os.link(src, os.path.join(tmp, name))
            except OSError:
                shutil.copy2(src, os.path.join(tmp, name))
    os.replace(tmp, out)
    return out
