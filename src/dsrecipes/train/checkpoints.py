"""Checkpoints that are never half-written, exact resume, preemption signals, and the final HF export.

    ckpt = Checkpoints(accelerator, output_dir, keep_last=2)
    path = ckpt.resolve(args.resume_from)            # 'latest' | a path | None
    state = ckpt.load(path)                          # accelerator.load_state + trainer_state.json
    state = ckpt.read_state(path)                    # trainer_state.json only (before anything is prepared)
    ckpt.save(step, {"step": step, ...})             # save_state into .tmp-*, then an atomic rename
    stop = StopFlag(); stop.requested(accelerator)   # SIGUSR1/SIGTERM/SIGINT seen on any rank?
    export_final(accelerator, model, tokenizer, out) # consolidated (ZeRO-3 too) HF directory, atomically
    ckpt.trainable_only()                            # LoRA: checkpoints hold only what trains (and its optimizer state)

Layout: output_dir/checkpoints/step_00000100/{pytorch_model/, random_states_*.pkl, trainer_state.json, hf_config/,
universal/ (only after an elastic resume: dsrecipes.train.elastic)}
and output_dir/checkpoints/latest (a text file naming the newest complete checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal

from dsrecipes.config.errors import ConfigError
from dsrecipes.train import watchdog

STATE_FILE = "trainer_state.json"
HF_CONFIG = "hf_config"  # the model's config.json, so that `dsrecipes checkpoint export` needs nothing else
# Fault injection for the crash test: SIGKILL this process after the checkpoint of step N is written
# to its temporary directory but before it is renamed into place.
KILL_IN_SAVE_ENV = "DSRECIPES_FAULT_KILL_IN_SAVE"
# Fault injection for the preemption tests: behave as if SIGUSR1 arrived during this process's N-th step.
PREEMPT_AT_ENV = "DSRECIPES_FAULT_PREEMPT_AT"


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def find_checkpoint(output_dir: str, resume_from: str | None) -> str | None:
    """The checkpoint --resume_from names: 'latest' (None when there is none yet: a requeued job's first run) or a
    directory, which must hold a complete checkpoint."""
    if not resume_from:
        return None
    root = os.path.join(output_dir, "checkpoints")
    if resume_from == "latest":
        pointer = os.path.join(root, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as fh:
            path = os.path.join(root, fh.read().strip())
        return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None
    if not os.path.isfile(os.path.join(resume_from, STATE_FILE)):
        raise ConfigError(
            "<args>",
            "resume_from",
            f"{resume_from!r} is not a complete checkpoint (no {STATE_FILE})",
            f"pass 'latest' or a directory under {root}",
        )
    return resume_from


def read_state(path: str) -> dict:
    """trainer_state.json of a checkpoint, without loading its model/optimizer states."""
    with open(os.path.join(path, STATE_FILE)) as fh:
        return json.load(fh)


class Checkpoints:
    def __init__(self, accelerator, output_dir: str, keep_last: int = 2):
        self.acc = accelerator
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = max(1, keep_last)
        self.save_kwargs: dict = {}  # for accelerate's save_state / load_state (DeepSpeed: its save/load_checkpoint)
        self.load_kwargs: dict = {}
        self.frozen_of = None  # trainable_only under DeepSpeed: the model whose frozen tied aliases are dropped
        if self.acc.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of a crash mid-write
                path = os.path.join(self.root, name)
                if name.startswith(".tmp-"):
                    shutil.rmtree(path, ignore_errors=True)
                elif name.startswith(".old-"):  # a re-save swapped this out: put it back if its successor is missing
                    final = os.path.join(self.root, name[len(".old-") :])
                    if os.path.exists(final):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.replace(path, final)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ find
    def latest(self) -> str | None:
        return find_checkpoint(os.path.dirname(self.root), "latest")

    def resolve(self, resume_from: str | None) -> str | None:
        return find_checkpoint(os.path.dirname(self.root), resume_from)

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, trainer_state: dict, model_config=None) -> str:
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp-{name}")
        if self.acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        with self._frozen_aliases_dropped():
            self.acc.save_state(tmp, **self.save_kwargs)  # every rank writes its ZeRO shards and RNG state
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            write_json_atomic(os.path.join(tmp, STATE_FILE), trainer_state)
            if model_config is not None:
                model_config.save_pretrained(os.path.join(tmp, HF_CONFIG))
            if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            old = os.path.join(self.root, f".old-{name}")
            if os.path.exists(final):  # re-saving a step (after a resume): move the old one aside, delete it last
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)  # a crash from here to the next replace: __init__ moves it back
            os.replace(tmp, final)
            with open(os.path.join(self.root, "latest.tmp"), "w") as fh:
                fh.write(name + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
            shutil.rmtree(old, ignore_errors=True)
            self._prune(keep=name)
        self.acc.wait_for_everyone()
        return final

    @contextlib.contextmanager
    def _frozen_aliases_dropped(self):
        """DeepSpeed's exclude_frozen_parameters deletes the frozen names that named_parameters() gives, which lists a
        tied weight once: its alias (GPT-2's lm_head.weight = wte.weight) stayed in every checkpoint. A state-dict
        hook drops every frozen name while the checkpoint is written (compat: deepspeed_exclude_frozen_tied)."""
        if self.frozen_of is None:
            yield
            return
        from dsrecipes.compat import guard

        guard("deepspeed_exclude_frozen_tied")
        frozen = {n for n, p in self.frozen_of.named_parameters(remove_duplicate=False) if not p.requires_grad}

        def drop(module, state_dict, prefix, local_metadata):
            for name in frozen:
                state_dict.pop(prefix + name, None)

        handle = self.frozen_of.register_state_dict_post_hook(drop)
        try:
            yield
        finally:
            handle.remove()

    def _prune(self, keep: str) -> None:
        done = sorted(n for n in os.listdir(self.root) if n.startswith("step_"))
        for name in done[: -self.keep_last]:
            if name != keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def load(self, path: str) -> dict:
        self.acc.load_state(path, **self.load_kwargs)
        return self.read_state(path)

    def trainable_only(self, model=None) -> None:
        """From now on a checkpoint holds only the parameters that train (LoRA's adapters) and their optimizer state.
        The frozen base is not written: a resumed run rebuilds it as the first start did (model_name_or_path, or the
        seeded init from model_config) and it never changes. DeepSpeed: save_checkpoint(exclude_frozen_parameters=
        True), load_checkpoint(load_module_strict=False); otherwise (DDP, one process) accelerate's save hook keeps
        the trainable tensors and its load hook loads them, checking that only frozen ones are missing. `model`: the
        unwrapped model (DeepSpeed keeps its frozen tied aliases otherwise, see _frozen_aliases_dropped)."""
        from accelerate.utils import DistributedType

        if getattr(self.acc, "distributed_type", None) == DistributedType.DEEPSPEED:
            self.save_kwargs = {"exclude_frozen_parameters": True}
            self.load_kwargs = {"load_module_strict": False}
            self.frozen_of = model
        else:
            self.acc.register_save_state_pre_hook(_keep_trainable)
            self.acc.register_load_state_pre_hook(_load_trainable)

    read_state = staticmethod(read_state)


def _trainable_names(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _keep_trainable(models, weights, output_dir) -> None:
    """accelerate save hook: drop the frozen tensors from each model's state dict before it is written."""
    for i, (model, state) in enumerate(zip(models, weights)):
        keep = _trainable_names(model)
        weights[i] = {k: v for k, v in state.items() if k in keep}


def _load_trainable(models, input_dir) -> None:
    """accelerate load hook: load each model's trainable tensors (non-strict, checked), then take the models off
    accelerate's list so that it does not load them strictly."""
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        path = os.path.join(input_dir, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        lost = _trainable_names(model) & set(missing)
        if unexpected or lost:
            raise RuntimeError(f"{path}: not this run's adapter (missing {sorted(lost)[:3]}, extra {unexpected[:3]})")
    models.clear()


class StopFlag:
    """Remembers SIGUSR1/SIGTERM (SLURM preemption) and SIGINT (Ctrl-C) so training can checkpoint at the next step
    boundary. Ctrl-C on `accelerate launch` reaches the ranks twice (the terminal signals the whole foreground
    process group, then torch elastic forwards SIGINT and SIGKILLs after its shutdown timeout, 30 s by default):
    both only set the flag. Also starts the orphan watchdog (dsrecipes.train.watchdog): a SIGTERM that comes from
    the launcher's death (PR_SET_PDEATHSIG) exits at once, writing nothing."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.signum, self.steps = 0, 0
        self.preempt_at = int(os.environ.get(PREEMPT_AT_ENV, "0"))
        for s in signals:
            signal.signal(s, self._handler)
        watchdog.start()

    def _handler(self, signum, frame):
        if watchdog.orphaned():
            watchdog.die(f" (signal {signum})")
        self.signum = signum

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank got a signal (ranks must stop at the same step)."""
        import torch

        self.steps += 1
        if self.steps == self.preempt_at:
            self.signum = signal.SIGUSR1
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def write_dir_atomic(accelerator, out_dir: str, write) -> str:
    """Rank 0 runs write(tmp_dir); the directory then replaces out_dir in one rename. Every rank waits for it."""
    tmp = out_dir.rstrip("/") + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def export_run(accelerator, model, tokenizer, args) -> str:
    """The training recipes' export: LoRA's (lora_export: merged final/ and/or final_adapter/) when lora_r > 0, else
    export_final into output_dir/final. Returns the first directory written."""
    from dsrecipes.train import lora

    if lora.enabled(args):
        return lora.export(accelerator, model, tokenizer, args)
    return export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "final"))


def export_final(accelerator, model, tokenizer, out_dir: str) -> str:
    """Consolidate the weights (gathering ZeRO-3 shards) and write an HF directory, via a temp dir + rename.
    (A LoRA run exports through dsrecipes.train.lora.export: merged final/ and/or final_adapter/.)"""
    state_dict = accelerator.get_state_dict(model)  # collective: every rank must call it

    def write(tmp):
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_dir_atomic(accelerator, out_dir, write)
