"""`dsrecipes checkpoint`: inspect, convert and export a training checkpoint without launching anything.

    dsrecipes checkpoint inspect outputs/train_lm            # the latest checkpoint (or give checkpoints/step_N)
    dsrecipes checkpoint inspect outputs/train_lm --json     # the same facts as JSON
    dsrecipes checkpoint convert outputs/train_lm            # DeepSpeed universal copy in <checkpoint>/universal
    dsrecipes checkpoint export outputs/train_lm out/hf [--tokenizer DIR]   # a Hugging Face model directory

inspect prints the step, phase, epoch position, the world that wrote it (processes, batch arithmetic, ZeRO stage,
precision) and which states it holds (weights, optimizer shards, LR schedule, sampler, RNG per rank, a cached
universal copy). convert is what an elastic resume does on its first start (dsrecipes.train.elastic). export
consolidates the fp32 weights with DeepSpeed's zero_to_fp32 (ZeRO 1-3; the model-states file for ZeRO-0) into the
model config the checkpoint carries (hf_config/), and writes safetensors atomically; from_pretrained loads it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from dsrecipes.config.errors import ConfigError
from dsrecipes.train import elastic
from dsrecipes.train.checkpoints import HF_CONFIG, STATE_FILE, find_checkpoint, read_state


def resolve(path: str) -> str:
    """A checkpoint directory, or an output_dir whose checkpoints/latest names one."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = find_checkpoint(path, "latest") if os.path.isdir(os.path.join(path, "checkpoints")) else None
    if found is None:
        raise ConfigError(
            path,
            "checkpoint",
            "neither a checkpoint (no trainer_state.json) nor an output_dir with checkpoints/latest",
            "give output_dir or output_dir/checkpoints/step_N",
        )
    return found


def _size(path: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(f))


def facts(path: str) -> dict:
    """What `inspect` reports, read from the files (nothing is loaded onto a device)."""
    state = read_state(path)
    engine = next((d for d in ("pytorch_model", "engine") if os.path.isdir(os.path.join(path, d))), None)
    files = sorted(os.listdir(os.path.join(path, engine))) if engine else []
    optim = [f for f in files if f.endswith("optim_states.pt")]
    universal = os.path.join(path, elastic.UNIVERSAL)
    return {
        "checkpoint": os.path.abspath(path),
        "step": state.get("step"),
        "phase": state.get("phase"),
        "epoch": state.get("epoch"),
        "batch_in_epoch": state.get("batch_in_epoch"),
        "world": elastic.saved_world(path, state),
        "engine": {"pytorch_model": "accelerate + DeepSpeed", "engine": "DeepSpeed pipeline engine"}.get(engine),
        "states": {
            "model_weights": any(f.endswith("model_states.pt") for f in files),
            "optimizer_shards": len(optim),
            "lr_scheduler": os.path.isfile(os.path.join(path, "scheduler.bin")) or engine == "engine",
            "sampler": os.path.isfile(os.path.join(path, "sampler.bin")),
            "rng_ranks": len(glob.glob(os.path.join(path, "random_states_*.pkl")) + glob.glob(f"{path}/rng_*.pt")),
            "model_config": os.path.isfile(os.path.join(path, HF_CONFIG, "config.json")),
            "universal_copy": os.path.isdir(universal),
        },
        "eval_loss": state.get("eval_loss"),
        "bytes": _size(path),
    }


def _print(f: dict) -> None:
    w, s = f["world"], f["states"]
    print(f"checkpoint {f['checkpoint']}")
    phase = f" ({f['phase']})" if f["phase"] else ""
    print(f"  step {f['step']}{phase}, epoch {f['epoch']}, micro-batch {f['batch_in_epoch']} of the epoch per rank")
    if w.get("global_batch"):
        print(
            f"  written by {w['processes']} process(es), ZeRO-{w.get('zero_stage')}, {w.get('mixed_precision')}: global"
            f" batch {w['global_batch']} = {w['per_device_train_batch_size']} x {w['gradient_accumulation_steps']}"
            f" accumulation x {w['processes']}"
        )
    else:
        print(f"  written by {w.get('processes')} process(es) (an older checkpoint: no batch record)")
    print(
        f"  {f['engine'] or 'no engine states'}: weights {'yes' if s['model_weights'] else 'no'}, optimizer shards "
        f"{s['optimizer_shards']}, LR schedule {'yes' if s['lr_scheduler'] else 'no'}, sampler "
        f"{'yes' if s['sampler'] else 'no'}, RNG for {s['rng_ranks']} rank(s), model config "
        f"{'yes' if s['model_config'] else 'no'}, universal copy {'yes' if s['universal_copy'] else 'no'}"
    )
    print(f"  eval loss {f['eval_loss']}, {f['bytes'] / 2**20:.1f} MiB on disk")


def export(path: str, out: str, tokenizer: str | None = None) -> str:
    """The checkpoint's fp32 weights as a Hugging Face directory (model config from <checkpoint>/hf_config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsrecipes.train.data import load_tokenizer

    engine = os.path.join(path, elastic.ENGINE_TAG)
    if not os.path.isdir(engine):
        raise ConfigError(
            path,
            "export",
            "not an accelerate + DeepSpeed checkpoint (pipeline checkpoints export at the end of "
            "recipes/train_pipeline.py, as final/)",
            "give a train_lm or distill checkpoint",
        )
    if not os.path.isfile(os.path.join(path, HF_CONFIG, "config.json")):
        raise ConfigError(
            path,
            HF_CONFIG,
            "no model config in this checkpoint (written before dsrecipes kept one)",
            "resume the run once to write a new checkpoint, or export its final/",
        )
    optim = glob.glob(os.path.join(engine, "*optim_states.pt"))
    if optim:  # ZeRO 1-3: gather the fp32 master weights from the optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(path, tag=elastic.ENGINE_TAG)
    else:  # ZeRO-0: the whole module is in the model-states file
        states = torch.load(os.path.join(engine, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        weights = {k: v.float() for k, v in states["module"].items()}
    config = AutoConfig.from_pretrained(os.path.join(path, HF_CONFIG))
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(
            path,
            "export",
            f"weights do not fit the config: missing {missing}, unexpected {unexpected}",
            "export with the dsrecipes version that wrote the checkpoint",
        )
    model.tie_weights()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(tokenizer, os.path.join(path, HF_CONFIG)).save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["inspect", "convert", "export"])
    parser.add_argument("path", help="a checkpoint directory, or an output_dir (its latest checkpoint)")
    parser.add_argument("out", nargs="?", help="export: the Hugging Face directory to write")
    parser.add_argument("--tokenizer", help="export: tokenizer dir (default: the checkpoint's, else the byte one)")
    parser.add_argument("--json", action="store_true", help="inspect: print the facts as JSON")


def run(ns) -> int:
    path = resolve(ns.path)
    if ns.action == "inspect":
        f = facts(path)
        print(json.dumps(f, indent=2)) if ns.json else _print(f)
    elif ns.action == "convert":
        cached = os.path.isdir(os.path.join(path, elastic.UNIVERSAL))
        print(("cached: " if cached else "converted: ") + elastic.to_universal(path))
    else:
        if not ns.out:
            raise ConfigError(
                "<cli>", "out", "export needs an output directory", "dsrecipes checkpoint export CKPT OUT"
            )
        print(f"exported step {read_state(path).get('step')} of {path} to {export(path, ns.out, ns.tokenizer)}")
    return 0
