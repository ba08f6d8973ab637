"""Which training techniques the pipeline recipe takes, and how each maps onto DeepSpeed's pipeline engine.

    check_args(args, where)                               # the refusals (pipeline_refusals), before any process group
    plan = checkpointing_plan(args, config, ds, where)    # HF-style gradient_checkpointing -> PipelineModule knobs
    config, aliases = head_config(config, args)           # untie the LM head when the embeddings freeze
    frozen = freeze_static(pipe, args, plan, where)       # requires_grad=False before deepspeed.initialize

- Activation checkpointing: `gradient_checkpointing: full` checkpoints every layer of a stage
  (activation_checkpoint_interval 1), `every_k` every k layers (checkpoint_every_k, default round(sqrt(n_layer))),
  `deepspeed` every layer through deepspeed.checkpointing configured from the JSON's activation_checkpointing
  section. gradient_checkpointing_reentrant picks DeepSpeed's reentrant `checkpoint` (true) or its
  `non_reentrant_checkpoint` (false, the default, as for the HF models of train_lm). activation_checkpoint_interval
  (the pipeline's own knob, reentrant) stays, but not together with gradient_checkpointing.
- Static freezing (freeze_embeddings, freeze_first_n_blocks, freeze_patterns over the HF parameter names): frozen
  parameters get no gradient and no optimizer state. A tied LM head gets its own trainable copy when the embeddings
  freeze (freeze_untie_head, as in train_lm), so the export is then an untied model. Every stage must keep something
  to train: the pipeline engine runs backward on every stage.
- Optimizers: every one of dsrecipes.train.optimizers is handed to deepspeed.initialize as a client optimizer
  (zero_allow_untested_optimizer); the rule table refuses the combinations that do not work (torchao under ZeRO-1).
- Refused: progressive freezing (the rule table's pipeline_progressive: it rebuilds the engine) and the frozen-prefix
  cache (it replaces the HF model's forward, which a pipeline stage does not run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from dsrecipes import compat
from dsrecipes.config.errors import ConfigError


# ----------------------------------------------------------------------------- refusals
def pipeline_refusals(args, where: str) -> list[ConfigError]:
    """Settings the pipeline recipe cannot run, known from the recipe values alone (the DeepSpeed JSON's refusals,
    ZeRO-2/3 among them, come from the rule table in setup.deepspeed_config). The rule table's pipeline rules first."""
    from dsrecipes.config import rules

    errs = rules.refusals(
        rules.settings_from(vars(args), None, recipe_kind="pipeline"), {"recipe": where}, component="pipeline"
    )
    # (the prefix cache is the table's pipeline_prefix_cache rule; what follows is one setting given twice)
    if args.gradient_checkpointing != "none" and args.activation_checkpoint_interval:
        errs.append(
            ConfigError(
                where,
                "activation_checkpoint_interval",
                f"{args.activation_checkpoint_interval} and gradient_checkpointing: {args.gradient_checkpointing} "
                "both set the pipeline's checkpointing",
                "set one of them (activation_checkpoint_interval: 0 with gradient_checkpointing)",
            )
        )
    return errs


def check_args(args, where: str) -> None:
    errs = pipeline_refusals(args, where)
    if errs:
        raise errs[0]


# ----------------------------------------------------------------------------- activation checkpointing
@dataclass
class CheckpointingPlan:
    mode: str  # none | interval (the pipeline's own knob) | full | every_k | deepspeed
    interval: int  # PipelineModule activation_checkpoint_interval (0 = off)
    reentrant: bool
    func: Callable | None  # PipelineModule activation_checkpoint_func (None: DeepSpeed's default, reentrant)
    deepspeed: dict | None = None  # deepspeed mode: deepspeed.checkpointing's knobs as configured

    def report(self) -> dict:
        out = {"mode": self.mode, "interval": self.interval, "reentrant": self.reentrant}
        return {**out, "deepspeed": self.deepspeed} if self.deepspeed is not None else out


def checkpointing_plan(args, config, ds_config: dict, where: str) -> CheckpointingPlan:
    from deepspeed import checkpointing

    mode = args.gradient_checkpointing
    if mode == "none":
        interval = args.activation_checkpoint_interval
        return CheckpointingPlan("interval" if interval else "none", interval, bool(interval), None)
    reentrant = bool(args.gradient_checkpointing_reentrant) or mode == "deepspeed"
    func = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
    if mode == "full":
        return CheckpointingPlan(mode, 1, reentrant, func)
    if mode == "every_k":
        from dsrecipes.memory.activation_checkpointing import default_every_k

        n = config.num_hidden_layers
        k = args.checkpoint_every_k or default_every_k(n)
        if k < 1 or k > n:
            raise ConfigError(
                where,
                "checkpoint_every_k",
                f"{k} is not between 1 and the {n} blocks",
                f"use 1..{n}, or 0 for round(sqrt(n_layer)) = {default_every_k(n)}",
            )
        return CheckpointingPlan(mode, k, reentrant, func)
    # deepspeed: DeepSpeed's own checkpoint configured from the JSON's activation_checkpointing section
    from dsrecipes.memory.activation_checkpointing import configure_deepspeed_checkpointing

    knobs = configure_deepspeed_checkpointing(args, None, ds_config, n_blocks=config.num_hidden_layers)
    return CheckpointingPlan(mode, 1, True, checkpointing.checkpoint, knobs)


# ----------------------------------------------------------------------------- static freezing
def freezes(args) -> bool:
    return bool(args.freeze_embeddings or args.freeze_first_n_blocks or args.freeze_patterns)


def head_config(config, args):
    """(config to build the pipeline with, {missing tensor name: tensor to load it from}). With tied embeddings that
    freeze and freeze_untie_head, the head becomes its own layer, initialised from the embedding matrix."""
    if not (config.tie_word_embeddings and args.freeze_embeddings and args.freeze_untie_head):
        return config, {}
    import copy

    from dsrecipes.pipeline.layers import hf_names

    untied = copy.deepcopy(config)
    untied.tie_word_embeddings = False
    return untied, {"lm_head.weight": hf_names(config)["embedding_weight"]}


def _frozen_by_args(name: str, args, patterns, names: dict) -> bool:
    if args.freeze_embeddings and name.startswith(names["embeddings"]):
        return True
    block = re.match(names["block"], name)
    if block and int(block.group(1)) < args.freeze_first_n_blocks:
        return True
    return any(p.search(name) for p in patterns)


def _input_requires_grad(_module, _inputs, out) -> None:
    (out[0] if isinstance(out, tuple) else out).requires_grad_(True)  # Llama-family: (hidden, position_ids)


def freeze_static(pipe, config, args, plan: CheckpointingPlan, where: str) -> int:
    """Collective. Freeze this stage's parameters by their HF names; -> frozen elements over all stages (a tied
    weight counted once). Refuses a stage left with nothing to train, the same way on every rank."""
    from dsrecipes.pipeline.hf_weights import local_hf_modules
    from dsrecipes.pipeline.layers import GPT2TokenEmbeddingPipe, hf_names

    n_layer, names = config.num_hidden_layers, hf_names(config)
    if args.freeze_first_n_blocks > n_layer:
        raise ConfigError(
            where,
            "freeze_first_n_blocks",
            f"{args.freeze_first_n_blocks} > {n_layer} blocks",
            f"use at most {n_layer}",
        )
    try:
        patterns = [re.compile(p) for p in args.freeze_patterns]
    except re.error as exc:
        raise ConfigError(where, "freeze_patterns", f"bad regex ({exc})", "fix the pattern") from None
    for prefix, module in local_hf_modules(pipe):
        for name, p in module.named_parameters():
            if _frozen_by_args(prefix + name, args, patterns, names):
                p.requires_grad_(False)
        is_embedding = isinstance(module, GPT2TokenEmbeddingPipe) or getattr(module, "is_token_embedding", False)
        frozen_input = is_embedding and not module.weight.requires_grad
        if frozen_input and plan.reentrant and plan.interval:
            # a reentrant checkpoint of the next segment would cut autograd off from the trainable blocks behind
            # a frozen embedding (what HF's enable_input_require_grads does for the same reason)
            module.register_forward_hook(_input_requires_grad)
    compat.drop_frozen_tied_weights(pipe)  # a frozen tied embedding + head has no gradient to all-reduce
    mine = [(n, p) for n, p in pipe.named_parameters() if not getattr(p, "ds_pipe_replicated", False)]
    local = {
        "stage": pipe.stage_id,
        "trainable": sum(p.numel() for _, p in pipe.named_parameters() if p.requires_grad),
        "frozen": sum(p.numel() for _, p in mine if not p.requires_grad),
    }
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    for part in parts:
        if part["trainable"] == 0:
            raise ConfigError(
                where,
                "freeze_*",
                f"freezing leaves pipeline stage {part['stage']} with nothing to train (the pipeline engine runs "
                "backward on every stage)",
                "freeze fewer blocks, or change partition_method / num_stages",
            )
    dp = len(parts) // max(pipe.num_stages, 1)
    return sum(part["frozen"] for part in parts) // max(dp, 1)
