"""Hugging Face weights in and out of a pipeline: each stage reads only its own tensors of an HF model directory
(or of a fresh HF model built with the recipe's seed), and the export gathers every stage into one HF directory.

    load_hf_weights(pipe, weight_source(args, config, tokenizer))  # each stage reads only its own tensors
    tied_diff = export_hf(pipe, config, tokenizer, "out/final")    # collective; AutoModelForCausalLM loads it

Layers carry their HF name prefix (hf_prefix, dsrecipes.pipeline.layers), so a stage's tensors are found by name.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import types

import torch
import torch.distributed as dist
from torch import nn

from dsrecipes.config.errors import ConfigError


# ----------------------------------------------------------------------------- HF weights in
def local_hf_modules(pipe):
    """(hf_prefix, module) for every module this stage holds; the tied head yields its embedding module."""
    seen = set()
    for f in pipe.forward_funcs:
        mod = f.args[0] if isinstance(f, functools.partial) else f
        if isinstance(mod, nn.Module) and hasattr(mod, "hf_prefix") and id(mod) not in seen:
            seen.add(id(mod))
            yield mod.hf_prefix, mod


class _CheckpointTensors:
    """Tensors of a local HF model directory by name, read lazily (a stage reads only its own)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.files: dict[str, str] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                self.files = {k: os.path.join(path, v) for k, v in json.load(fh)["weight_map"].items()}
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
                self.files = {k: os.path.join(path, "model.safetensors") for k in fh.keys()}
        self.loaded = {}
        if not self.files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            self.loaded = torch.load(
                os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True
            )
        if not self.files and not self.loaded:
            raise ConfigError(
                "<args>",
                "model_name_or_path",
                f"no model.safetensors(.index.json) or pytorch_model.bin in {path!r}",
                "give an HF model directory (an exported final/ works)",
            )
        names = set(self.files) | set(self.loaded)
        self.prefix = "" if any(k.startswith("transformer.") for k in names) else "transformer."  # a bare GPT2Model

    def get(self, name: str):
        from safetensors import safe_open

        key = name[len(self.prefix) :] if self.prefix and name.startswith(self.prefix) else name
        if key in self.loaded:
            return self.loaded[key]
        if key not in self.files:
            return None
        with safe_open(self.files[key], "pt") as fh:
            return fh.get_tensor(key)


def weight_source(args, config, tokenizer=None):
    """Where the initial weights come from: model_name_or_path, or a fresh HF model built with the recipe's seed
    (the same initialisation train_lm.py gets; every rank builds it once, keeps its stage, drops the rest)."""
    if args.model_name_or_path:
        if not os.path.isdir(args.model_name_or_path):
            raise ConfigError(
                "<args>",
                "model_name_or_path",
                f"{args.model_name_or_path!r} is not a local directory",
                "download the model first (huggingface-cli download) and pass its directory",
            )
        return _CheckpointTensors(args.model_name_or_path)
    from dsrecipes.train.models import build_causal_lm

    return types.SimpleNamespace(get=build_causal_lm(args, tokenizer).state_dict().get)  # same .get as a checkpoint


def load_hf_weights(pipe, source, aliases: dict | None = None) -> None:
    """aliases: {tensor name: name to read when the source lacks it} (an untied head from a tied checkpoint)."""
    aliases = aliases or {}
    for prefix, module in local_hf_modules(pipe):
        state = {}
        for name, current in module.state_dict().items():
            tensor = source.get(prefix + name)
            if tensor is None and prefix + name in aliases:
                tensor = source.get(aliases[prefix + name])
            if tensor is None:
                raise ConfigError(
                    "<args>",
                    "model_name_or_path",
                    f"the checkpoint has no tensor {prefix + name!r}",
                    "use a checkpoint of this model type saved by transformers",
                )
            if tuple(tensor.shape) != tuple(current.shape):
                raise ConfigError(
                    "<args>",
                    "model_name_or_path",
                    f"{prefix + name} has shape {tuple(tensor.shape)}, the config says {tuple(current.shape)}",
                    "use the config.json saved with the weights",
                )
            state[name] = tensor
        module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- HF weights out
def gather_hf_state_dict(pipe):
    """Collective. -> (full HF state dict on rank 0, else None; max |difference| between the copies of tied weights)."""
    grid = pipe.mpu()
    local = {}
    if grid.get_data_parallel_rank() == 0:
        for prefix, module in local_hf_modules(pipe):
            for name, tensor in module.state_dict().items():
                local[prefix + name] = tensor.detach().cpu().clone()
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if dist.get_rank() != 0:
        return None, None
    merged, tied_diff = {}, 0.0
    for part in parts:
        for name, tensor in part.items():
            if name in merged:  # a tied weight: one copy per stage that uses it
                tied_diff = max(tied_diff, (merged[name].float() - tensor.float()).abs().max().item())
            else:
                merged[name] = tensor
    return merged, tied_diff


def export_hf(pipe, config, tokenizer, out_dir: str):
    """Collective: gather every stage's weights and write an HF directory (temp dir + rename). -> tied diff."""
    state_dict, tied_diff = gather_hf_state_dict(pipe)
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
        if sorted(missing) != expected_missing or unexpected:
            raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()
    return tied_diff
