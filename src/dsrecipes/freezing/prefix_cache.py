"""Frozen-prefix cache: compute a frozen prefix's output once per sample, reuse it, skip the prefix's forward.

    cache = PrefixCache(model, mode="memory", max_mb=1024)   # model: the HF model (unwrapped)
    cache.activate(depth)     # the embeddings and blocks[:depth] are frozen: from now on cache block depth-1's output
    model(**batch)            # forward hooks do the rest; cache.stats() -> hits, misses, MiB, why it is off

How: a pre-forward hook on the model keys each row of `input_ids` (plus `attention_mask`) by content. When every
row of the batch has an entry, the frozen blocks are swapped for pass-throughs for this one forward (their
`forward` is replaced, so parameter names, checkpoints and DeepSpeed hooks are untouched) and the last frozen
block returns the cached hidden states; blocks between an entry's depth and the current depth still run, so
entries made before the prefix grew are extended instead of thrown away. On a miss the real prefix runs and a
forward hook on its last block stores the rows. Only in training mode; eval forwards pass through untouched.

Correct only when the prefix is a pure function of the sample, so the cache turns itself off, with a message,
when dropout is active in the prefix (the embeddings' or any frozen block's), under ZeRO-3 (partitioned
parameters are gathered by module hooks that must see every block run), under `every_k` checkpointing (each
segment's first block runs the whole segment, so blocks cannot be skipped one by one), and when it fills up before
any sample comes back (data augmentation or random crops make every input new). Bounded: `max_mb` per process; rows
beyond it are recomputed. Mode `disk` keeps entries as files in `cache_dir` (default: a temporary directory, removed
at exit) instead of RAM. With reentrant checkpointing (HF `full` reentrant, or `deepspeed`) a cached hidden state is
handed on as requiring grad, as the real prefix's output would be after `enable_input_require_grads`, or the first
trainable block would get no gradients.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile

import torch

from dsrecipes.train.models import decoder_parts, transformer_blocks


def prefix_dropout(model, depth: int) -> list[str]:
    """Names of dropout modules/attributes active in the embeddings or blocks[:depth] (model in train mode)."""
    blocks = transformer_blocks(model)
    in_suffix = {id(m) for blk in blocks[depth:] for m in blk.modules()}
    after_prefix = _after_prefix_modules(model, blocks)
    found = []
    for name, mod in model.named_modules():
        if id(mod) in in_suffix or id(mod) in after_prefix:
            continue
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
            found.append(f"{name} (p={mod.p})")
        for attr in ("attention_dropout", "dropout_p"):
            val = getattr(mod, attr, None)
            if isinstance(val, float) and val > 0:
                found.append(f"{name}.{attr}={val}")
    return found


def _after_prefix_modules(model, blocks) -> set[int]:
    """Modules computed after the blocks (final norm, LM head): their dropout does not touch the prefix."""
    inside = {id(m) for blk in blocks for m in blk.modules()}
    parts = decoder_parts(model)
    out = set()
    for mod in (parts["final_norm"], parts["head"]):
        if mod is not None:
            out |= {id(m) for m in mod.modules()}
    return out - inside


class _Store:
    """Entries {key: (depth, tensor)} in RAM or as files, with a byte bound."""

    def __init__(self, mode: str, max_bytes: int, cache_dir: str | None):
        self.mode, self.max_bytes, self.bytes = mode, max_bytes, 0
        self.index: dict[bytes, int] = {}  # key -> depth (RAM entries live in self.ram)
        self.ram: dict[bytes, torch.Tensor] = {}
        self.dir = None
        if mode == "disk":
            if cache_dir:
                self.dir = cache_dir
            else:
                self.dir = tempfile.mkdtemp(prefix="dsrecipes_prefix_cache_")
                atexit.register(shutil.rmtree, self.dir, True)
            os.makedirs(self.dir, exist_ok=True)

    def get(self, key: bytes):
        if key not in self.index:
            return None
        if self.mode == "memory":
            return self.index[key], self.ram[key]
        return self.index[key], torch.load(os.path.join(self.dir, key.hex() + ".pt"), weights_only=True)

    def clear(self) -> None:
        self.index, self.ram, self.bytes = {}, {}, 0
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def put(self, key: bytes, depth: int, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if key not in self.index and self.bytes + size > self.max_bytes:
            return False
        if key not in self.index:
            self.bytes += size
        self.index[key] = depth
        if self.mode == "memory":
            self.ram[key] = value
        else:
            tmp = os.path.join(self.dir, key.hex() + ".tmp")
            torch.save(value, tmp)
            os.replace(tmp, os.path.join(self.dir, key.hex() + ".pt"))
        return True


class PrefixCache:
    def __init__(
        self,
        model,
        mode: str = "memory",
        max_mb: int = 1024,
        cache_dir: str | None = None,
        zero3: bool = False,
        log=print,
        checkpointing: str = "none",
        reentrant: bool = False,
    ):
        self.model, self.log = model, log
        self.input_grad = checkpointing == "deepspeed" or (checkpointing == "full" and reentrant)
        self.blocks = transformer_blocks(model)
        self.store = _Store(mode, int(max_mb) * 2**20, cache_dir)
        self.depth = 0
        self.off_reason = None
        if zero3:
            self.turn_off(
                "ZeRO-3 gathers each block's parameters in module hooks, which must see every block run; "
                "use ZeRO 0-2 for the prefix cache"
            )
        if checkpointing == "every_k":
            self.turn_off(
                "every_k checkpointing runs each segment of blocks from the segment's first block, so frozen "
                "blocks cannot be skipped one by one; use gradient_checkpointing: full or none with freeze_cache"
            )
        self.hits = self.misses = self.lookups = self.full = 0
        self._plan = None
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    # ------------------------------------------------------------------ control
    def activate(self, depth: int) -> None:
        """The embeddings and blocks[:depth] are frozen from now on."""
        if self.off_reason or depth <= self.depth:
            return
        dropout = prefix_dropout(self.model, depth)
        if dropout:
            return self.turn_off(
                f"dropout is active in the frozen prefix ({', '.join(dropout[:3])}"
                f"{', ...' if len(dropout) > 3 else ''}), so its output differs on every pass; "
                "set the dropout probabilities to 0 to use freeze_cache"
            )
        self.depth = depth

    def turn_off(self, reason: str) -> None:
        if not self.off_reason:
            self.off_reason = reason
            self.log(f"freeze_cache off: {reason}")

    def stats(self) -> dict:
        return {
            "depth": self.depth,
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self.store.index),
            "mib": round(self.store.bytes / 2**20, 2),
            "full": self.full,
            "off_reason": self.off_reason,
        }

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    # ------------------------------------------------------------------ hooks
    def _keys(self, kwargs) -> list[bytes] | None:
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("past_key_values") is not None:
            return None
        mask = kwargs.get("attention_mask")
        rows = ids.detach().cpu()
        masks = mask.detach().cpu() if mask is not None else [None] * len(rows)
        keys = []
        for r, m in zip(rows, masks):
            h = hashlib.blake2b(r.numpy().tobytes(), digest_size=16)
            if m is not None:
                h.update(m.numpy().tobytes())
            keys.append(h.digest())
        return keys

    def _pre(self, module, args, kwargs):
        self._plan = None
        if self.off_reason or self.depth == 0 or not module.training:
            return None
        keys = self._keys(kwargs)
        if keys is None:
            return None
        self.lookups += len(keys)
        found = [self.store.get(k) for k in keys]
        self._restore, self._hooks, self._captured = [], [], None
        if all(f is not None for f in found):
            self.hits += len(keys)
            self._inject([f[0] for f in found], torch.stack([f[1] for f in found]).to(kwargs["input_ids"].device))
            start = min(f[0] for f in found)
        else:
            self.misses += len(keys)
            start = 0
        if start < self.depth:  # some rows need (part of) the prefix computed: store its output afterwards
            self._hooks.append(self.blocks[self.depth - 1].register_forward_hook(self._capture))
        self._plan = keys
        return None

    def _inject(self, depths: list[int], cached: torch.Tensor) -> None:
        """Skip blocks before the shallowest entry; put each row's entry back in after its own depth.

        Blocks treat rows independently, so a row whose entry is deeper than the batch's shallowest one just
        rides along until its depth, where its cached value replaces it (entries made before the prefix grew
        are extended by the blocks between their depth and the current one)."""
        start = min(depths)
        if self.input_grad and torch.is_grad_enabled():
            cached = cached.requires_grad_(True)  # a reentrant checkpoint only back-props into blocks whose input does
        for i, blk in enumerate(self.blocks[:start]):
            self._restore.append((blk, blk.__dict__.get("forward")))
            blk.forward = _passthrough(cached if i == start - 1 else None)
        for d in sorted(set(depths) - {start}):
            rows = torch.tensor([i for i, x in enumerate(depths) if x == d], device=cached.device)
            self._hooks.append(self.blocks[d - 1].register_forward_hook(_replace_rows(rows, cached[rows])))

    def _capture(self, module, args, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def _post(self, module, args, kwargs, output):
        if self._plan is None:
            return None
        for blk, own in self._restore:  # back to the forward the block had (the class's, unless someone set one)
            if own is None:
                del blk.forward
            else:
                blk.forward = own
        for h in self._hooks:
            h.remove()
        keys, self._plan = self._plan, None
        if self._captured is not None:
            rows = self._captured.detach().to("cpu", copy=True)
            for k, row in zip(keys, rows):
                if not self.store.put(k, self.depth, row.clone()):
                    self.full += 1
        if self.full and self.hits == 0 and self.store.index:
            self.turn_off(
                f"it filled up ({len(self.store.index)} entries, {self.store.bytes / 2**20:.0f} MiB) and no "
                "sample has come back: data augmentation or random crops make every input new, or the data "
                "is seen only once"
            )
            self.store.clear()
        return None


def _passthrough(hidden):
    """A block forward that computes nothing: returns `hidden` when given, else its own input."""

    def forward(hidden_states=None, *args, **kwargs):
        return hidden if hidden is not None else hidden_states

    return forward


def _replace_rows(rows, values):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[rows] = values
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    return hook
