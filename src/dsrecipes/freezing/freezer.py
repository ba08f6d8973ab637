"""Layer freezing (book ch. 8): frozen parameters get no gradients and no optimizer state.

    n_frozen = apply_static_freezing(model, args)   # freeze_embeddings, freeze_first_n_blocks, freeze_patterns
    freezer = Freezer(model, args, accelerator)     # static + progressive (scheduled or adaptive) + prefix cache
    ...                                             # build the optimizer and prepare as usual, then per step:
    model, optimizer, scheduler = freezer.after_step(step, model, optimizer, scheduler)

Progressive freezing freezes from the front: unit 0 is the embeddings plus block 0, unit i is block i, up to
`freeze_progressive_blocks` units (default all blocks but the last). With a tied LM head (GPT-2, tiny Llama and
Qwen2) the head gets its own trainable copy of the matrix when the embeddings freeze (freeze_untie_head), so the
output layer keeps learning as in FreezeOut and AutoFreeze, which never freeze it. Blocks and embeddings are found
by dsrecipes.train.models (transformer.h / wte+wpe for GPT-2, model.layers / embed_tokens for Llama-family).
- linear / cubic (FreezeOut-style): unit i freezes at step max_steps * t_i, t_i running from freeze_start to
  freeze_end linearly in i, or linearly in t^(1/3) for cubic (front units freeze earlier, back units later).
- adaptive (AutoFreeze-style): every freeze_check_steps steps the gradient norm of each unfrozen block over
  the interval is compared with the previous interval; a block whose relative change stayed below
  freeze_threshold for freeze_window intervals in a row freezes, front first (never before freeze_start).
Each time the frozen set grows, the optimizer and the DeepSpeed engine are rebuilt over the trainable
parameters (dsrecipes.freezing.rebuild), because flipping requires_grad after deepspeed.initialize frees nothing and
ZeRO would keep moving the "frozen" weights with their old momentum (DeepSpeed #5341).
`freeze_cache: memory|disk` adds the frozen-prefix cache (dsrecipes.freezing.prefix_cache).
"""

from __future__ import annotations

import json
import os
import re

import torch

from dsrecipes.config.errors import ConfigError
from dsrecipes.train.models import embedding_modules, transformer_blocks


def apply_static_freezing(model, args) -> int:
    """Set requires_grad=False per the config; returns the number of frozen parameter elements."""
    blocks = transformer_blocks(model) if args.freeze_first_n_blocks else []
    if args.freeze_first_n_blocks > len(blocks):
        raise ConfigError(
            "<args>",
            "freeze_first_n_blocks",
            f"{args.freeze_first_n_blocks} > {len(blocks)} blocks",
            f"use at most {len(blocks)}",
        )
    targets = list(blocks[: args.freeze_first_n_blocks])
    if args.freeze_embeddings:
        targets += embedding_modules(model)
    for mod in targets:
        for p in mod.parameters():
            p.requires_grad_(False)
    if args.freeze_patterns:
        try:
            pats = [re.compile(p) for p in args.freeze_patterns]
        except re.error as exc:
            raise ConfigError("<args>", "freeze_patterns", f"bad regex ({exc})", "fix the pattern") from None
        for name, p in model.named_parameters():
            if any(pat.search(name) for pat in pats):
                p.requires_grad_(False)
    return frozen_param_count(model)


def untie_output_head(model) -> dict[str, str]:
    """Give an LM head tied to the input embeddings its own copy of the matrix, so it can keep training when the
    embeddings freeze. Returns {head weight name: embedding weight name} ({} when nothing was tied)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight or hasattr(emb.weight, "ds_id"):  # ZeRO-3 shards: left tied
        return {}
    emb_name = next(n for n, p in model.named_parameters() if p is emb.weight)
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False  # saved and reloaded as two matrices from now on
    getattr(model, "all_tied_weights_keys", {}).pop(head_name, None)
    return {head_name: emb_name}


def frozen_param_count(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if not p.requires_grad)


def frozen_prefix_depth(model) -> int:
    """How many leading blocks are frozen together with the embeddings (0 if any embedding still trains)."""
    if any(p.requires_grad for m in embedding_modules(model) for p in m.parameters()):
        return 0
    depth = 0
    for blk in transformer_blocks(model):
        if any(p.requires_grad for p in blk.parameters()):
            break
        depth += 1
    return depth


def _checksum(modules) -> list[float]:
    """(sum, sum of squares) in float64 of the modules' weights: proves frozen weights stay put."""
    flat = [p.detach().double() for m in modules for p in m.parameters()]
    return [sum(float(t.sum()) for t in flat), sum(float((t * t).sum()) for t in flat)]


def freeze_units(model, n_units: int) -> list[list[torch.nn.Module]]:
    blocks = transformer_blocks(model)
    return [embedding_modules(model) + [blocks[0]]] + [[blocks[i]] for i in range(1, n_units)]


def schedule_steps(kind: str, n_units: int, max_steps: int, start: float, end: float) -> list[int]:
    """FreezeOut-style freeze step of each unit: linear in the unit index, or cubic (linear in t^(1/3))."""
    out = []
    for i in range(n_units):
        frac = i / (n_units - 1) if n_units > 1 else 0.0
        if kind == "cubic":
            t = (start ** (1 / 3) + (end ** (1 / 3) - start ** (1 / 3)) * frac) ** 3
        else:
            t = start + (end - start) * frac
        out.append(max(1, round(t * max_steps)))
    return out


class GradNormMonitor:
    """AutoFreeze-style test: per block, the gradient norm over each interval vs the previous interval."""

    def __init__(self, blocks, check_steps: int, threshold: float, window: int, state: dict | None = None):
        self.check_steps, self.threshold, self.window = check_steps, threshold, window
        self.sq = [torch.zeros(()) for _ in blocks]
        self.n_steps = 0  # optimizer steps summed in self.sq (fewer than check_steps after a resume mid-interval)
        self.prev = (state or {}).get("prev") or [None] * len(blocks)
        self.streak = (state or {}).get("streak") or [0] * len(blocks)
        self.history: list[dict] = []
        self.handles = []
        for i, blk in enumerate(blocks):
            for p in blk.parameters():
                if p.requires_grad:
                    self.handles.append(p.register_hook(self._hook(i)))

    def _hook(self, i):
        def add(grad):
            self.sq[i] = self.sq[i].to(grad.device) + grad.detach().float().pow(2).sum()

        return add

    def update(self, step: int, accelerator) -> list[int]:
        """At the end of an interval: the streak of each block (all ranks see the same numbers)."""
        self.n_steps += 1
        if step % self.check_steps:
            return self.streak
        sq = torch.stack(self.sq).to(accelerator.device)
        if accelerator.num_processes > 1:
            sq = accelerator.reduce(sq, reduction="mean")
        norms = (sq.cpu() / self.n_steps).sqrt().tolist()  # mean squared norm per step, then its root
        for i, n in enumerate(norms):
            prev = self.prev[i]
            if n == 0:  # no gradient at all: the block is already frozen (e.g. statically)
                self.streak[i] += 1
            elif prev is not None and prev > 0:
                self.streak[i] = self.streak[i] + 1 if abs(n - prev) / prev < self.threshold else 0
            self.prev[i] = n
        self.history.append({"step": step, "grad_norms": [round(n, 5) for n in norms], "streak": list(self.streak)})
        self.sq, self.n_steps = [torch.zeros(()) for _ in self.sq], 0
        return self.streak

    def state(self) -> dict:
        return {"prev": self.prev, "streak": self.streak}

    def close(self):
        for h in self.handles:
            h.remove()


def _resumed_state(args) -> dict:
    """The freezer's state in the checkpoint this run resumes from (it must be applied before the optimizer)."""
    path = args.resume_from
    if not path:
        return {}
    if path == "latest":
        pointer = os.path.join(args.output_dir, "checkpoints", "latest")
        if not os.path.isfile(pointer):
            return {}
        with open(pointer) as fh:
            path = os.path.join(args.output_dir, "checkpoints", fh.read().strip())
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        return {}
    with open(state_file) as fh:
        return json.load(fh).get("freezer") or {}


class Freezer:
    """Everything freezing does for one run; recipes call the constructor and after_step only."""

    def __init__(self, model, args, accelerator, resumed: dict | None = None):
        """resumed: the freezer state of the checkpoint this run resumes (dsrecipes.train.loop.Session gives it per
        phase); None reads it from args.resume_from."""
        from dsrecipes.freezing.rebuild import check_rebuild_supported
        from dsrecipes.train.accelerator import zero_stage

        self.args, self.acc, self.events = args, accelerator, []
        self.schedule = args.freeze_schedule
        resumed = _resumed_state(args) if resumed is None else resumed
        if args.freeze_untie_head and (args.freeze_embeddings or resumed.get("frozen_units", 0)):
            untie_output_head(model)  # before the optimizer exists: nothing to carry over
        apply_static_freezing(model, args)
        n_blocks = len(transformer_blocks(model))
        self.n_units = args.freeze_progressive_blocks or n_blocks - 1
        if self.schedule != "none":
            if not 1 <= self.n_units <= n_blocks:
                raise ConfigError(
                    "<args>",
                    "freeze_progressive_blocks",
                    f"{self.n_units} is not in 1..{n_blocks}",
                    f"use 1..{n_blocks} (0 = all blocks but the last)",
                )
            if not 0 <= args.freeze_start <= args.freeze_end <= 1:
                raise ConfigError(
                    "<args>",
                    "freeze_start",
                    f"need 0 <= freeze_start ({args.freeze_start}) <= freeze_end ({args.freeze_end}) <= 1",
                    "fix the fractions",
                )
            check_rebuild_supported(accelerator, args)
        self.units = freeze_units(model, self.n_units) if self.schedule != "none" else []
        for unit in self.units[: resumed.get("frozen_units", 0)]:
            for mod in unit:
                mod.requires_grad_(False)
        self.n_frozen = 0  # progressive freezing goes front to back: count the leading units that are fully frozen
        while self.n_frozen < len(self.units) and not any(
            p.requires_grad for m in self.units[self.n_frozen] for p in m.parameters()
        ):
            self.n_frozen += 1
        self.steps = (
            schedule_steps(self.schedule, self.n_units, args.max_steps, args.freeze_start, args.freeze_end)
            if self.schedule in ("linear", "cubic")
            else None
        )
        self.monitor = None
        if self.schedule == "adaptive":
            blocks = transformer_blocks(model)[: self.n_units]
            self.monitor = GradNormMonitor(
                blocks, args.freeze_check_steps, args.freeze_threshold, args.freeze_window, resumed.get("monitor")
            )
        self.cache = None
        if args.freeze_cache != "none":
            from dsrecipes.freezing.prefix_cache import PrefixCache

            cache_dir = args.freeze_cache_dir
            if cache_dir and accelerator.num_processes > 1:
                cache_dir = os.path.join(cache_dir, f"rank{accelerator.process_index}")
            self.cache = PrefixCache(
                model,
                args.freeze_cache,
                args.freeze_cache_max_mb,
                cache_dir,
                zero3=zero_stage(accelerator) == 3,
                log=accelerator.print,
                checkpointing=args.gradient_checkpointing,
                reentrant=bool(args.gradient_checkpointing_reentrant),
            )
            self.cache.activate(frozen_prefix_depth(model))
        self.initial_frozen = frozen_param_count(model)
        self.checksums: dict[int, list[float]] = {}
        self.model = model

    @property
    def frozen_params(self) -> int:
        return frozen_param_count(self.model)

    def _target(self, step: int) -> int:
        """How many progressive units should be frozen after `step`."""
        if self.steps is not None:
            return sum(1 for s in self.steps if step >= s)
        if self.monitor is not None:
            streak = self.monitor.update(step, self.acc)
            if step < self.args.freeze_start * self.args.max_steps:
                return self.n_frozen
            n = self.n_frozen
            while n < self.n_units and streak[n] >= self.args.freeze_window:
                n += 1
            return n
        return self.n_frozen

    def after_step(self, step: int, model, optimizer, scheduler):
        """Freeze the units due after this optimizer step; rebuild optimizer/engine when the set grew."""
        target = self._target(step)
        if target <= self.n_frozen:
            return model, optimizer, scheduler
        from dsrecipes.freezing.rebuild import optimizer_param_count, rebuild_after_freezing

        def change(raw):
            aliases = untie_output_head(raw) if self.n_frozen == 0 and self.args.freeze_untie_head else {}
            for i in range(self.n_frozen, target):
                for mod in self.units[i]:
                    mod.requires_grad_(False)
                self.checksums[i] = _checksum(self.units[i])
            return aliases  # the untied head starts from the embedding's Adam state

        before = optimizer_param_count(model, optimizer)
        model, optimizer, scheduler = rebuild_after_freezing(self.acc, model, optimizer, scheduler, self.args, change)
        after = optimizer_param_count(model, optimizer)
        depth = frozen_prefix_depth(self.model)
        self.events.append(
            {
                "step": step,
                "frozen_units": target,
                "prefix_depth": depth,
                "frozen_params": self.frozen_params,
                "optimizer_params_before": before,
                "optimizer_params_after": after,
            }
        )
        self.acc.print(
            f"step {step}: froze units {self.n_frozen}..{target - 1} (embeddings + {depth} blocks frozen); "
            f"optimizer now holds {after:,} of {before:,} elements on this rank"
        )
        self.n_frozen = target
        if self.cache is not None:
            self.cache.activate(depth)
        return model, optimizer, scheduler

    def state(self) -> dict:
        """Goes into trainer_state.json, so a resumed run freezes the same units before building its optimizer."""
        out = {"frozen_units": self.n_frozen}
        if self.monitor is not None:
            out["monitor"] = self.monitor.state()
        return out

    def report(self) -> dict:
        out = {
            "schedule": self.schedule,
            "frozen_units": self.n_frozen,
            "events": self.events,
            "initial_frozen_params": self.initial_frozen,
            "final_frozen_params": self.frozen_params,
        }
        if self.checksums:  # weights of every unit frozen during the run, unchanged since its freeze step
            out["frozen_weights_unchanged"] = all(_checksum(self.units[i]) == c for i, c in self.checksums.items())
        if self.steps is not None:
            out["planned_steps"] = self.steps
        if self.monitor is not None:
            out["grad_norm_history"] = self.monitor.history[-20:]
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        return out
