"""AutoTP training as the recipes see it: DeepSpeed's `"tensor_parallel": {"autotp_size": N}` shards the Linear layers
of a Hugging Face model over N consecutive ranks (the engine does it in deepspeed.initialize; accelerate builds the
"tp" device mesh and splits the data by data-parallel rank only, so the N ranks of a TP group get the same batch).

    tp_size(acc)                  # N from the DeepSpeed JSON (1: no TP)
    data_parallel_size(acc)       # processes // N: what token counts and data fingerprints count
    data_sum(acc, value)          # the data fingerprint over data-parallel ranks; raises if a TP group disagrees
    gather_for_metrics(acc, x)    # eval values gathered with each TP group once
    sharding(model)               # this rank's parameter bytes: sharded Linear layers against replicated ones

configs/deepspeed/zero{1,2}_tp2.json are the configs; the refusals are in dsrecipes.config.rules_tp and the
composition cells in dsrecipes.config.compat_tp.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from dsrecipes.config.fields_parallel import autotp_size  # the one tp reader (also the rule table's tp axis)


def tp_size(acc) -> int:
    """The TP size of a run's Accelerator (or of anything without a DeepSpeed plugin: 1), read from its DeepSpeed
    config by the reader the rule table's tp axis uses (config/fields_parallel.autotp_size)."""
    plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
    return autotp_size(plugin.deepspeed_config if plugin is not None else None)


def data_parallel_size(acc) -> int:
    """How many different batches one micro-step trains on: the processes over the TP size."""
    return max(acc.num_processes // tp_size(acc), 1)


def data_sum(acc, value: int) -> int:
    """The sum of `value` (a rank's sum of token ids since the last log) over the data-parallel ranks. Under TP the
    per-rank values are gathered and every TP group (ranks g*N .. g*N+N-1, DeepSpeed's (dp, tp) mesh) must agree:
    its ranks trained on one batch (axolotl #2491 is what happens when they do not), so the group counts once."""
    total = torch.tensor([value], dtype=torch.float64, device=acc.device)
    if acc.num_processes == 1:
        return int(total.item())
    size = tp_size(acc)
    if size == 1:
        return int(acc.reduce(total, reduction="sum").item())
    per_rank = [int(v) for v in acc.gather(total).tolist()]
    groups = [per_rank[g : g + size] for g in range(0, len(per_rank), size)]
    if any(len(set(group)) != 1 for group in groups):
        raise RuntimeError(f"ranks of a tensor-parallel group trained on different batches: data sums {groups}")
    return sum(group[0] for group in groups)


def check_model(model, acc, where: str) -> None:
    """Before accelerator.prepare: refuse, in one line, what AutoTP training cannot do with this model and config
    (the engine would fail later with a traceback, or train but break evaluation)."""
    from dsrecipes.config.errors import ConfigError

    size = tp_size(acc)
    if size == 1:
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    dpath = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "<deepspeed>"
    config = model.config
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan

    if not _get_hf_tp_plan(model) and not AutoTP.supported(model):
        raise ConfigError(
            where,
            "model_config",
            f"AutoTP training does not support {config.model_type} (DeepSpeed 0.19: GPT-2's Conv1D layers have "
            "no AutoTP policy, 'AutoTP not supported for model')",
            "use a Llama or Qwen2 model (configs/models/tiny_llama.json), or a config without tensor_parallel",
        )
    if ds.get("zero_optimization", {}).get("stage") == 3 and "train_batch_size" in ds:
        raise ConfigError(
            dpath,
            "train_batch_size",
            "set with ZeRO-3 and AutoTP: DeepSpeed 0.19 checks it against micro x accumulation x all processes in "
            "the engine but against the data-parallel ranks only in its zero.Init, so no value passes both",
            'remove the key (micro-batch and accumulation stay "auto"; configs/deepspeed/zero3_tp2.json)',
        )
    if ds.get("tensor_parallel", {}).get("vocab_parallel_lm_head") is not False:
        raise ConfigError(
            dpath,
            "tensor_parallel.vocab_parallel_lm_head",
            "not false: DeepSpeed then shards a tied LM head by vocabulary and its logits are 1/N wide, which the "
            "eval loss (and every loss computed from logits) cannot read",
            "set false (configs/deepspeed/zero1_tp2.json): the embedding and head stay replicated",
        )


def gather_for_metrics(acc, values: torch.Tensor) -> torch.Tensor:
    """accelerate's gather_for_metrics, counting each TP group once. accelerate splits the eval data by data-parallel
    rank (every rank of a TP group gets the same batch) but gathers from every process, so its gather_for_metrics
    would hold each sample N times, then cut the last batch by a remainder counted in data-parallel ranks: the eval
    loss of a tp=2 run was 3.49506 where the exported model gives 3.49494. Here: gather, keep the first rank of each
    TP group (ranks 0, N, 2N, ...: data-parallel order), cut the remainder as accelerate does."""
    size = tp_size(acc)
    if size == 1:
        return acc.gather_for_metrics(values)
    gathered = acc.gather(values).reshape(acc.num_processes, -1, *values.shape[1:])[::size]
    gathered = gathered.reshape(-1, *values.shape[1:])
    state = acc.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        gathered = gathered[: state.remainder]
    return gathered


def _numel(p) -> int:
    """The parameter's numel on this TP rank (under ZeRO-3 its TP shard before ZeRO partitions it over the
    data-parallel ranks as well: ds_numel)."""
    return getattr(p, "ds_numel", p.numel())


def _full_numel(module, name: str, param) -> int:
    """The parameter's numel before AutoTP split it (the layer keeps the original shapes)."""
    shape = getattr(module, f"_orig_{name}_shape", None)
    return math.prod(shape) if shape is not None else _numel(param)


def sharding(model) -> dict | None:
    """This rank's parameter bytes, read from the real tensors (each tensor once, so a tied embedding and LM head
    count once): `sharded` are the parameters of AutoTP's layers that hold 1/N of the original (the Linear layers),
    `replicated` the rest (embeddings, norms, a row-parallel layer's bias, a head kept whole), with their names.
    Gradients and AdamW states follow the parameters, so the same split holds for them (ZeRO then divides what its
    stage partitions by the data-parallel ranks on top of this). None without AutoTP."""
    if "deepspeed.module_inject.layers" not in sys.modules:  # AutoTP imported it when it sharded the model
        return None
    from deepspeed.module_inject.layers import TensorParallel_Layer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TensorParallel_Layer)]
    if not layers or max(getattr(m, "tp_world_size", 1) for _, m in layers) <= 1:
        return None
    size = max(m.tp_world_size for _, m in layers)
    seen, local, full = set(), 0, 0
    sharded_names = []
    for prefix, module in layers:
        for name, p in module.named_parameters(recurse=False):
            whole = _full_numel(module, name, p)
            if id(p) in seen or _numel(p) >= whole:
                continue
            seen.add(id(p))
            local += _numel(p) * p.element_size()
            full += whole * p.element_size()
            sharded_names.append(f"{prefix}.{name}")
    replicated, replicated_names = 0, []
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) not in seen:
            seen.add(id(p))
            replicated += _numel(p) * p.element_size()
            replicated_names.append(name)
    whole_model = full + replicated
    return {
        "tp_size": size,
        "sharded": {"bytes": local, "unsharded_bytes": full, "ratio": local / full if full else None},
        "replicated": {"bytes": replicated, "names": _families(replicated_names)},
        "sharded_layers": _families(sharded_names),
        "param_bytes": local + replicated,
        "unsharded_param_bytes": whole_model,
        "param_ratio": (local + replicated) / whole_model if whole_model else None,
    }


def _families(names: list[str]) -> list[str]:
    """Parameter names with the layer index replaced by *, deduplicated in order (model.layers.*.mlp.up_proj.weight)."""
    out: list[str] = []
    for name in names:
        family = ".".join("*" if part.isdigit() else part for part in name.split("."))
        if family not in out:
            out.append(family)
    return out
