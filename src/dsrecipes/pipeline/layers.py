"""A GPT-2 causal LM as a DeepSpeed PipelineModule: layer specs, HF weights in and out, and the bubble meter.

    config = pipeline_config(args, tokenizer)                      # HF GPT2Config (gpt2 models only)
    pipe = build_pipeline(config, num_stages=2, partition_method="type:block", activation_checkpoint_interval=0)
    load_hf_weights(pipe, weight_source(args, config, tokenizer))  # each stage reads only its own tensors
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=opt, config=ds_config)
    meter = BubbleMeter(engine)                                    # busy vs idle time of every stage
    export_hf(pipe, config, tokenizer, "out/final")                # collective; AutoModelForCausalLM loads it

Layers: [wte, wpe + dropout, block x n_layer, ln_f, lm_head]. With tie_word_embeddings the first and the last
are one TiedLayerSpec("wte"): both stages hold a copy, DeepSpeed all-reduces its gradient after backward.
Used by recipes/train_pipeline.py, benchmarks/throughput_pipeline.py and tests/test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import time
import types
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from dsrecipes.config.errors import ConfigError


# ----------------------------------------------------------------------------- layers
class GPT2TokenEmbeddingPipe(nn.Embedding):
    """wte. Tied: the same module (one copy per stage that uses it) also serves as the LM head."""

    hf_prefix = "transformer.wte."


class GPT2PositionPipe(nn.Module):
    hf_prefix = "transformer."

    def __init__(self, config):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, inputs_embeds):
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        return self.drop(inputs_embeds + self.wpe(positions))


class GPT2BlockPipe(GPT2Block):
    """transformers' GPT2Block with a one-tensor interface (SDPA with is_causal: no mask tensor to pass)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        self.hf_prefix = f"transformer.h.{layer_idx}."

    def forward(self, hidden_states):
        return super().forward(hidden_states)


class GPT2FinalNormPipe(nn.LayerNorm):
    hf_prefix = "transformer.ln_f."

    def __init__(self, config):
        super().__init__(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadPipe(nn.Linear):
    """The head of a model with tie_word_embeddings: false."""

    hf_prefix = "lm_head."

    def __init__(self, config):
        super().__init__(config.n_embd, config.vocab_size, bias=False)


def tied_lm_head(embedding, hidden_states):
    return F.linear(hidden_states, embedding.weight)


def causal_lm_loss(logits, labels):
    """transformers' own causal-LM loss: shift by one, mean cross-entropy over labels != -100."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


# Segments made only of these run under activation checkpointing (the token embedding takes integer ids, so
# DeepSpeed's reentrant checkpoint could not give it gradients; the tied head is a function, never checkpointed).
CHECKPOINTABLE = ["GPT2PositionPipe", "GPT2BlockPipe", "GPT2FinalNormPipe", "GPT2LMHeadPipe"]


# ----------------------------------------------------------------------------- config and specs
def pipeline_config(args, tokenizer=None):
    """The HF config of model_name_or_path (a local dir) or of model_config; only GPT-2 models."""
    from transformers import AutoConfig

    from dsrecipes.train.models import load_model_config

    if args.model_name_or_path:
        try:
            config = AutoConfig.from_pretrained(args.model_name_or_path)
        except Exception as exc:  # noqa: BLE001 - any failure is a bad model input
            raise ConfigError(
                "<args>",
                "model_name_or_path",
                f"cannot load the config of {args.model_name_or_path!r} ({type(exc).__name__})",
                "give a local HF model directory (an exported final/ works)",
            ) from None
        where = args.model_name_or_path
    else:
        config, where = load_model_config(args.model_config, tokenizer), args.model_config
    if config.model_type != "gpt2":
        raise ConfigError(
            where,
            "model_type",
            f"{config.model_type!r} is not supported by the pipeline recipe",
            "use a GPT-2 model (model_type gpt2)",
        )
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(
            where, "add_cross_attention", "cross-attention models cannot be pipelined here", "set it to false"
        )
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # causal without a mask tensor; the same kernel the HF model uses on CPU
    return config


def layer_specs(config) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    vocab, hidden = config.vocab_size, config.n_embd
    if config.tie_word_embeddings:
        first = TiedLayerSpec("wte", GPT2TokenEmbeddingPipe, vocab, hidden, tied_weight_attr="weight")
        last = TiedLayerSpec(
            "wte", GPT2TokenEmbeddingPipe, vocab, hidden, forward_fn=tied_lm_head, tied_weight_attr="weight"
        )
    else:
        first, last = LayerSpec(GPT2TokenEmbeddingPipe, vocab, hidden), LayerSpec(GPT2LMHeadPipe, config)
    blocks = [LayerSpec(GPT2BlockPipe, config, i) for i in range(config.n_layer)]
    return [first, LayerSpec(GPT2PositionPipe, config), *blocks, LayerSpec(GPT2FinalNormPipe, config), last]


def check_partition(specs, num_stages: int, method: str, where: str = "<args>") -> None:
    if num_stages < 1:
        raise ConfigError(where, "num_stages", f"{num_stages} stages", "use 1 or more")
    if len(specs) < num_stages:
        raise ConfigError(where, "num_stages", f"{num_stages} stages for {len(specs)} layers", "use fewer stages")
    low = method.lower()
    if low in ("parameters", "uniform"):
        return
    if not low.startswith("type:"):
        raise ConfigError(
            where,
            "partition_method",
            f"{method!r} is not a partition method",
            "use parameters, uniform or type:<regex> (e.g. type:block)",
        )
    try:
        pattern = re.compile(low.split(":")[1], re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(where, "partition_method", f"bad regex in {method!r} ({exc})", "fix the regex") from None
    names = [s.typename.__name__ for s in specs]
    hits = sum(1 for n in names if pattern.search(n))
    if hits < num_stages:
        raise ConfigError(
            where,
            "partition_method",
            f"{method!r} matches {hits} layer(s) of {sorted(set(names))}, fewer than num_stages={num_stages}",
            "match more layers, e.g. type:block",
        )


def build_pipeline(
    config,
    num_stages: int,
    partition_method: str = "type:block",
    activation_checkpoint_interval: int = 0,
    where: str = "<args>",
):
    """A PipelineModule; each rank builds only its stage's layers (needs torch.distributed initialised)."""
    from deepspeed.pipe import PipelineModule

    specs = layer_specs(config)
    check_partition(specs, num_stages, partition_method, where)
    if activation_checkpoint_interval < 0:
        raise ConfigError(
            where, "activation_checkpoint_interval", f"{activation_checkpoint_interval}", "use 0 (off) or k >= 1"
        )
    pipe = PipelineModule(
        layers=specs,
        num_stages=num_stages,
        loss_fn=causal_lm_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=CHECKPOINTABLE,
    )
    # Gradient clipping under ZeRO-0 (deepspeed.runtime.utils.clip_grad_norm_) sums squared norms over the
    # model-parallel group but only counts model-parallel rank 0's parameters unless they are flagged, so every
    # stage after the first was left out of the global norm (measured: updates 20% off the unsplit model's).
    # Flag each stage's own parameters; the second copy of a tied weight (ds_pipe_replicated) stays unflagged,
    # so it counts once. ZeRO-1 computes the same global norm either way.
    for p in pipe.parameters():
        p.model_parallel = not getattr(p, "ds_pipe_replicated", False)
    return pipe


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


def load_hf_weights(pipe, source) -> None:
    for prefix, module in local_hf_modules(pipe):
        state = {}
        for name, current in module.state_dict().items():
            tensor = source.get(prefix + name)
            if tensor is None:
                raise ConfigError(
                    "<args>",
                    "model_name_or_path",
                    f"the checkpoint has no tensor {prefix + name!r}",
                    "use a GPT-2 checkpoint saved by transformers",
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


# ----------------------------------------------------------------------------- bubble meter
def bubble_formula(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


class BubbleMeter:
    """Measures each stage's idle (bubble) time in train_batch by timing the engine's pipeline instructions.

    busy   = the stage's ForwardPass + BackwardPass instructions (its compute, loss included)
    window = train_batch start -> every stage of this pipeline has finished its last backward (a barrier over
             the pipe group right before OptimizerStep, so a stage that finishes early keeps counting idle time)
    idle   = window - busy: waiting in send/recv (the bubble), p2p copies, loading micro-batches, tied all-reduce
    The optimizer step is outside the window, as in the formula (p - 1) / (m + p - 1) for equal stages.
    """

    BUSY = ("ForwardPass", "BackwardPass")
    P2P = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")
    KEYS = ("busy", "window", "p2p", "other", "step", "steps")

    def __init__(self, engine, warmup_steps: int = 1):
        self.engine, self.warmup_steps = engine, warmup_steps
        self.active, self.seen = False, 0
        self.cur, self.acc, self.total = (defaultdict(float) for _ in range(3))
        self.per_step = []  # (busy, window) of each measured step, for the per-step median
        table = dict(type(engine)._INSTRUCTION_MAP)
        for kind, fn in table.items():
            table[kind] = self._timed(kind.__name__, fn)
        engine._INSTRUCTION_MAP = table  # the engine looks the table up on self: this instance only

    def _timed(self, name, fn):
        meter = self

        def run(engine, **kwargs):
            if not meter.active:
                return fn(engine, **kwargs)
            if name == "OptimizerStep":
                dist.barrier(group=engine.grid.get_pipe_parallel_group())
                meter.cur["window"] += time.perf_counter() - meter._t0
            t = time.perf_counter()
            out = fn(engine, **kwargs)
            dt = time.perf_counter() - t
            meter.cur["busy" if name in meter.BUSY else "p2p" if name in meter.P2P else "other"] += dt
            return out

        return run

    @contextlib.contextmanager
    def step(self):
        """Wrap one engine.train_batch call."""
        self.cur.clear()
        self.active, self._t0 = True, time.perf_counter()
        try:
            yield
        finally:
            self.active = False
            self.cur["step"] = time.perf_counter() - self._t0
            self.cur["steps"] = 1
            self.seen += 1
            for k, v in self.cur.items():
                self.acc[k] += v
                if self.seen > self.warmup_steps:  # the first train_batch also exchanges shapes and allocates
                    self.total[k] += v
            if self.seen > self.warmup_steps:
                self.per_step.append((self.cur["busy"], self.cur["window"]))

    def collect(self, total: bool = False) -> dict:
        """Collective: idle fractions per stage (averaged over data-parallel replicas) since the last collect, or
        with total=True over every step after the warm-up."""
        src = self.total if total else self.acc
        mine = torch.tensor([src[k] for k in self.KEYS], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        if not total:
            self.acc.clear()
        grid, stages = self.engine.grid, self.engine.num_stages
        per_stage = [torch.zeros_like(mine) for _ in range(stages)]
        for rank, part in enumerate(parts):
            per_stage[grid._topo.get_coord(rank).pipe] += part
        busy, window, p2p, _, step, steps = (list(x) for x in zip(*[s.tolist() for s in per_stage]))
        idle = [(w - b) / w if w > 0 else 0.0 for b, w in zip(busy, window)]
        n = max(steps[0], 1.0)
        extra = self._per_step_median(stages) if total else {}
        return {
            **extra,
            "bubble_measured": sum(idle) / stages,
            "bubble_formula": bubble_formula(stages, self.engine.micro_batches),
            "stage_idle_fraction": idle,
            "stage_p2p_fraction": [c / w if w > 0 else 0.0 for c, w in zip(p2p, window)],
            "stage_busy_s": [b / n for b in busy],
            "window_s": window[0] / n,
            "step_time_s": step[0] / n,
            "measured_steps": int(steps[0] / (dist.get_world_size() // stages)),
        }

    def _per_step_median(self, stages: int) -> dict:
        """Collective: each measured step's idle fraction (mean over stages and replicas), and their median, which a
        burst of other load on a shared machine moves less than the pooled sum over steps."""
        mine = torch.tensor(self.per_step or [(0.0, 0.0)], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        if not self.per_step:
            return {}
        fractions = torch.stack([(p[:, 1] - p[:, 0]) / p[:, 1].clamp_min(1e-12) for p in parts])  # ranks x steps
        per_step = fractions.mean(0)  # every stage has the same number of replicas: mean over ranks = over stages
        return {
            "bubble_per_step": [round(x, 4) for x in per_step.tolist()],
            "bubble_measured_median": float(per_step.median()),
        }
