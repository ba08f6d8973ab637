"""Rebuild the optimizer (and the DeepSpeed engine or DDP wrapper) after more parameters were frozen.

    model, optimizer, scheduler = rebuild_after_freezing(accelerator, model, optimizer, scheduler, args, change)

Why: setting requires_grad=False after `deepspeed.initialize` frees nothing (DeepSpeed #5341). ZeRO keeps the
frozen parameters in its flat fp32 partitions and Adam state, and keeps stepping them with their old momentum.
So at each freeze point we tear the engine down (`accelerator.free_memory()`, which calls `engine.destroy()`
and removes ZeRO's gradient hooks) and prepare a new one over the trainable parameters only. What must survive
the rebuild is carried over exactly:
- Adam state (exp_avg, exp_avg_sq, step) of the parameters that stay trainable. Under ZeRO 1/2 (and DeepSpeed
  bf16) it is gathered per parameter from the flat partitions at the addresses DeepSpeed's `_hp_mapping` gives
  (as `deepspeed.utils.safe_get_full_optimizer_state` does) and written into the new partitions the same way;
  without ZeRO it is the torch optimizer's state dict, handed over as it is.
- fp32 master weights (differ from the module's weights under bf16).
- the LR schedule position, and accelerate's registered dataloaders (their sampler state goes into checkpoints).
Supported: no DeepSpeed (1 process or DDP), ZeRO 1 and 2, and ZeRO 0 in fp32, with optimizer adamw. ZeRO-3,
ZeRO-Offload and ZeRO-0 with bf16/fp16 (its FP16_UnfusedOptimizer keeps fp32 copies outside `_hp_mapping`) are
refused by `check_rebuild_supported`, which asks the rule table (dsrecipes.config.rules); static freezing,
decided before the engine is built, works everywhere.
"""

from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def check_rebuild_supported(accelerator, args, where: str = "<args>") -> None:
    """Raise the rule table's refusal (dsrecipes.config.rules, component "rebuild") for this run's settings."""
    from dsrecipes.config import rules

    rules.raise_first(rules.settings_for_run(accelerator, args), where, component="rebuild")


def _base_optimizer(model, optimizer):
    """The torch optimizer that holds the state (DeepSpeed's basic_optimizer, or accelerate's wrapped one)."""
    base = getattr(model, "basic_optimizer", None)
    if base is not None:
        return base
    return getattr(optimizer, "optimizer", optimizer)


def _full(p, flat_state, key):
    """One parameter's full fp32 tensor (key None: master weight) assembled from the ZeRO partitions: DeepSpeed's
    safe_get_full_optimizer_state fails outside the first param group (dsrecipes.compat.zero_full_fp32)."""
    from dsrecipes.compat import zero_full_fp32

    return zero_full_fp32(p, flat_state, key)


def _gather(model, optimizer, params: dict[str, torch.nn.Parameter]) -> dict:
    """Full (unpartitioned) state of every parameter in `params`: {name: {key: tensor}} plus the Adam step.

    Collective under ZeRO: every rank calls it, with the same parameters in the same order."""
    base = _base_optimizer(model, optimizer)
    out, step = {}, None
    stepped = len(base.state) > 0  # the same on every rank: Adam state exists once the first step has run

    def flat_state(m):
        return base.state[base.param_groups[m.param_group_index]["params"][0]]

    for name, p in params.items():
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 or DeepSpeed bf16: flat fp32 partitions
            out[name] = {"fp32": _full(p, flat_state, None)}
            for key in ADAM_KEYS if stepped else ():
                out[name][key] = _full(p, flat_state, key)
        elif p in base.state:
            out[name] = dict(base.state[p])
    for st in base.state.values():
        if "step" in st:
            step = st["step"].clone() if torch.is_tensor(st["step"]) else st["step"]
            break
    return {"params": out, "step": step}


def _install(model, optimizer, params: dict[str, torch.nn.Parameter], saved: dict) -> None:
    base = _base_optimizer(model, optimizer)
    hp = [(n, p) for n, p in params.items() if getattr(p, "_hp_mapping", None) is not None]
    if not hasattr(next(iter(params.values())), "_hp_mapping"):
        for name, p in params.items():  # torch optimizer keyed by parameter: hand the state over as it was
            if name in saved["params"]:
                base.state[p] = saved["params"][name]
        return
    if saved["step"] is not None:  # create the flat partitions' state up front, then fill each fragment
        for group in base.param_groups:
            for flat in group["params"]:
                step = saved["step"].clone() if torch.is_tensor(saved["step"]) else saved["step"]
                base.state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
    for name, p in hp:
        st, m = saved["params"].get(name), p._hp_mapping
        if st is None:
            continue
        lo, hi = m.lp_fragment_address, m.hp_fragment_address
        flat = base.param_groups[m.param_group_index]["params"][0]
        m.hp_fragment.data.copy_(st["fp32"].flatten().narrow(0, lo.start, lo.numel))
        for key in ADAM_KEYS:
            if key in st and flat in base.state:
                base.state[flat][key].narrow(0, hi.start, hi.numel).copy_(
                    st[key].flatten().narrow(0, lo.start, lo.numel)
                )


def _continue_schedule(scheduler, last_epoch: int) -> None:
    """Put a fresh LambdaLR at `last_epoch`, with the optimizer's learning rates set to match."""
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.last_epoch = last_epoch
    lrs = [base * lam(last_epoch) for base, lam in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    from dsrecipes.compat import set_scheduler_last_lr

    set_scheduler_last_lr(inner, lrs)


def rebuild_after_freezing(accelerator, model, optimizer, scheduler, args, change):
    """`change(raw_model)` freezes parameters (and may untie a head: it returns {new name: name whose state it
    starts from}); then the engine/wrapper and optimizer are dropped and new ones prepared over the parameters
    that still require grad, with their state carried over."""
    from dsrecipes.train.accelerator import make_scheduler
    from dsrecipes.train.optimizers import build_optimizer

    raw = accelerator.unwrap_model(model)
    saved = _gather(model, optimizer, {n: p for n, p in raw.named_parameters() if p.requires_grad})
    for new, old in change(raw).items():
        if old in saved["params"]:
            saved["params"][new] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved["params"][old].items()}
    keep = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    last_epoch = getattr(scheduler, "scheduler", scheduler).last_epoch
    from dsrecipes.compat import accelerator_dataloaders

    dataloaders = list(accelerator_dataloaders(accelerator))  # free_memory forgets them; checkpoints need them
    del model, optimizer, scheduler
    accelerator.free_memory()  # DeepSpeed: engine.destroy() removes ZeRO's grad hooks and buffers
    accelerator_dataloaders(accelerator).extend(dataloaders)
    new_opt = build_optimizer(raw, args)
    new_sched = make_scheduler(new_opt, args)
    model, optimizer, scheduler = accelerator.prepare(raw, new_opt, new_sched)
    _install(model, optimizer, keep, saved)
    _continue_schedule(scheduler, last_epoch)
    model.train()
    return model, optimizer, scheduler


def optimizer_param_count(model, optimizer) -> int:
    """Elements the optimizer really updates on this rank (ZeRO: this rank's flat partitions)."""
    base = _base_optimizer(model, optimizer)
    return sum(p.numel() for g in base.param_groups for p in g["params"])
