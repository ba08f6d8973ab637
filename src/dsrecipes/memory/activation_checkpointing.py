"""Activation checkpointing (book ch. 4, recomputation), switched on from the recipe config.

    info = apply_activation_checkpointing(model, args, accelerator)
    # modes: none | full | every_k | layer_selective | selective_ops | deepspeed

Modes: `full` is Hugging Face checkpointing (reentrant or not); `every_k` keeps only the input of every k-th block
and recomputes each k-block segment in backward (Chen et al. 2016; k = round(sqrt(n_layer)) by default); the two
selective modes trade time for memory, as torchtitan does: `layer_selective` checkpoints only every k-th block
(transformers' every_n_layers; k = checkpoint_every_k, default 2) and keeps the others' activations, so the
recompute cost is the checkpointed fraction of full's; `selective_ops` checkpoints every block but saves the outputs
of matmuls and attention (torch.utils.checkpoint.create_selective_checkpoint_contexts) and recomputes only the cheap
pointwise ops; `deepspeed` runs every block through `deepspeed.checkpointing.checkpoint`, configured from the
DeepSpeed JSON's `activation_checkpointing` section (as gpt-neox does). Used by recipes/train_lm.py, distill.py and
benchmarks/bench_memory.py.
"""

from __future__ import annotations

import functools
import math

import torch

from dsrecipes.config.errors import ConfigError
from dsrecipes.memory.measure import RECORDERS
from dsrecipes.train.models import transformer_blocks

DS_KNOBS = {  # activation_checkpointing key -> module-level name in deepspeed.checkpointing after configure()
    "partition_activations": "PARTITION_ACTIVATIONS",
    "contiguous_memory_optimization": "CONTIGUOUS_CHECKPOINTING",
    "cpu_checkpointing": "CPU_CHECKPOINT",
    "number_checkpoints": "num_layers",
    "synchronize_checkpoint_boundary": "SYNCHRONIZE",
    "profile": "PROFILE_TIME",
}


# aten ops whose outputs `selective_ops` keeps: the matmuls and the fused attention kernels (everything else, the
# pointwise ops, norms, activations and softmax, is recomputed in backward)
SAVED_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
MODES = ("none", "full", "every_k", "layer_selective", "selective_ops", "deepspeed")


# ============================================================================ activation checkpointing
def default_every_k(n_layer: int) -> int:
    """Chen et al.'s sqrt(n) segment length: n/k kept inputs + k recomputed blocks is smallest at k = sqrt(n)."""
    return max(1, round(math.sqrt(n_layer)))


def apply_activation_checkpointing(model, args, accelerator=None, ds_config: dict | None = None) -> dict:
    """Switch on args.gradient_checkpointing; returns what was done (logged to summary.json)."""
    mode = args.gradient_checkpointing
    info = {"mode": mode}
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if mode != "deepspeed" and (ds_config or getattr(plugin, "deepspeed_config", None) or {}).get(
        "activation_checkpointing"
    ):
        raise ConfigError(
            "<deepspeed>",
            "activation_checkpointing",
            f"has no effect with gradient_checkpointing: {mode}",
            "set gradient_checkpointing: deepspeed in the recipe, or use a DeepSpeed JSON without it",
        )
    if mode == "none":
        return info
    reentrant = bool(args.gradient_checkpointing_reentrant)
    model.config.use_cache = False
    if mode == "full":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        return {**info, "reentrant": reentrant, "checkpointed_blocks": len(transformer_blocks(model))}
    blocks = transformer_blocks(model)
    if mode == "layer_selective":
        k = _block_interval(args, len(blocks), 2, " (layer_selective checkpoints blocks 0, k, 2k, ...), or 0 for 2")
        kwargs = {"use_reentrant": reentrant}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=k)
        picked = [i for i, b in enumerate(blocks) if getattr(b, "gradient_checkpointing", False)]
        return {**info, "reentrant": reentrant, "every_k": k, "checkpointed_blocks": len(picked), "blocks": picked}
    if mode == "selective_ops":
        if reentrant:
            raise ConfigError(
                "<args>",
                "gradient_checkpointing_reentrant",
                "selective_ops needs non-reentrant checkpointing (its policy is a context_fn)",
                "set gradient_checkpointing_reentrant: false",
            )
        kwargs = {"use_reentrant": False, "context_fn": functools.partial(_selective_contexts, _saved_ops())}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return {**info, "reentrant": False, "checkpointed_blocks": len(blocks), "saved_ops": list(SAVED_OPS)}
    if mode == "every_k":
        n = len(blocks)
        k = _block_interval(args, n, default_every_k(n), f", or 0 for round(sqrt(n_layer)) = {default_every_k(n)}")
        _segment_blocks(blocks, k, reentrant)
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        return {**info, "reentrant": reentrant, "every_k": k, "segments": math.ceil(len(blocks) / k)}
    if mode == "deepspeed":
        section = configure_deepspeed_checkpointing(args, accelerator, ds_config, n_blocks=len(blocks))
        from dsrecipes.compat import set_gradient_checkpointing_func

        for block in blocks:  # HF's GradientCheckpointingLayer calls this function around the block's forward
            set_gradient_checkpointing_func(block, _deepspeed_checkpoint)
        model.enable_input_require_grads()  # DeepSpeed's checkpoint is reentrant
        return {**info, "deepspeed": section, "checkpointed_blocks": len(blocks)}
    raise ConfigError("<args>", "gradient_checkpointing", f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")


def _block_interval(args, n_blocks: int, default: int, hint: str) -> int:
    """checkpoint_every_k (0 = `default`), refused in one line unless it is 1..n_blocks."""
    k = args.checkpoint_every_k or default
    if k < 1 or k > n_blocks:
        problem = f"{k} is not between 1 and the {n_blocks} blocks"
        raise ConfigError("<args>", "checkpoint_every_k", problem, f"use 1..{n_blocks}{hint}")
    return k


def _saved_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in SAVED_OPS if hasattr(torch.ops.aten, name))


def _selective_contexts(saved):
    """The context pair torch's non-reentrant checkpoint runs forward and recompute under: keep `saved` ops'
    outputs, recompute the rest. torch keeps those outputs in its own cache, outside autograd's saved-tensor hooks,
    so while a measure.SavedActivations is open the forward context also hands them to it."""
    import contextlib

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
    if not RECORDERS:
        return forward_ctx, recompute_ctx
    stack = contextlib.ExitStack()
    stack.enter_context(forward_ctx)
    stack.enter_context(_RecordOutputs(saved))  # entered last, so it sees each op first and the cache's copy after
    return stack, recompute_ctx


def _RecordOutputs(saved):
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in saved:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    for rec in RECORDERS:
                        rec.add(t)
            return out

    return RecordOutputs()


def _segment_blocks(blocks, k: int, reentrant: bool) -> None:
    """Block i*k runs blocks i*k .. i*k+k-1 inside one torch checkpoint; the others pass their input through when
    the model's loop calls them (their real forward runs inside the segment, through __call__, so hooks still fire)."""
    from torch.utils.checkpoint import checkpoint

    for start in range(0, len(blocks), k):
        members = list(blocks[start : start + k])
        for block in members:
            block._dsr_run = False
            block.forward = _segment_forward(
                block, block.forward, members if block is members[0] else None, checkpoint, reentrant
            )


def _segment_forward(block, real_forward, members, checkpoint, reentrant):
    def forward(hidden_states, *args, **kwargs):
        if block._dsr_run:
            return real_forward(hidden_states, *args, **kwargs)
        if members is None:
            return hidden_states  # already computed by this segment's first block

        def run(h):
            for m in members:
                m._dsr_run = True
                try:
                    h = m(h, *args, **kwargs)
                finally:
                    m._dsr_run = False
            return h

        if block.training and torch.is_grad_enabled():
            return checkpoint(run, hidden_states, use_reentrant=reentrant)
        return run(hidden_states)

    return forward


def _deepspeed_checkpoint(function, hidden_states, *rest):
    """deepspeed.checkpointing.checkpoint on the hidden states only: DeepSpeed frees the storage of the floating-point
    inputs it partitions or moves, and a shared attention mask passed along must survive for the next block."""
    import deepspeed

    for rec in RECORDERS:  # DeepSpeed keeps the input on ctx, outside autograd's saved-tensor hooks
        rec.add(hidden_states)
    return deepspeed.checkpointing.checkpoint(lambda h: function(h, *rest), hidden_states)


def deepspeed_section(accelerator=None, ds_config: dict | None = None) -> dict:
    """The `activation_checkpointing` section of the DeepSpeed config this run uses ({} if absent)."""
    if ds_config is None:
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if plugin is None:
            raise ConfigError(
                "<args>",
                "gradient_checkpointing",
                "deepspeed mode reads the DeepSpeed JSON's "
                "activation_checkpointing section, but this run has no DeepSpeed config",
                "launch with a DeepSpeed accelerate YAML (configs/accelerate/deepspeed_cpu_2proc.yaml), "
                "or use gradient_checkpointing: full",
            )
        ds_config = plugin.deepspeed_config
    return dict(ds_config.get("activation_checkpointing") or {})


def configure_deepspeed_checkpointing(args, accelerator=None, ds_config=None, n_blocks: int | None = None) -> dict:
    """deepspeed.checkpointing.configure(mpu_=None, deepspeed_config=...) with the JSON's section; returns what
    DeepSpeed's module now holds (read back, so a knob that does not arrive shows up)."""
    import deepspeed

    section = deepspeed_section(accelerator, ds_config)
    on_cpu = (
        accelerator.device.type if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    ) == "cpu"
    from dsrecipes.config import rules

    settings = rules.Settings(
        device="cpu" if on_cpu else "gpu", cpu_checkpointing=bool(section.get("cpu_checkpointing"))
    )
    rules.raise_first(settings, "<deepspeed>", component="activation_checkpointing")
    if section.get("contiguous_memory_optimization"):
        if not section.get("partition_activations"):
            raise ConfigError(
                "<deepspeed>",
                "activation_checkpointing.contiguous_memory_optimization",
                "needs partition_activations: true",
                "set partition_activations: true or drop this knob",
            )
        if n_blocks and (section.get("number_checkpoints") or 0) < n_blocks:
            raise ConfigError(
                "<deepspeed>",
                "activation_checkpointing.number_checkpoints",
                f"must be at least the {n_blocks} checkpointed blocks to size the contiguous buffers",
                f"set it to {n_blocks}",
            )
    # A config of its own: accelerate fills the JSON's "auto" values only later, at prepare().
    from dsrecipes.config.deepspeed import fill_auto

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    cfg = fill_auto(cfg, args, 1, None, keys=set(cfg)) | {"activation_checkpointing": section}
    deepspeed.checkpointing.configure(mpu_=None, deepspeed_config=cfg)
    return deepspeed_checkpointing_state()


def deepspeed_checkpointing_state() -> dict:
    import deepspeed

    return {key: getattr(deepspeed.checkpointing, name) for key, name in DS_KNOBS.items()}
