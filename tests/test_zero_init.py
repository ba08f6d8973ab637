"""Models built under deepspeed.zero.Init (zero3_init_flag: true) are the models built unsharded: the same weights
from the same seed, and the same weight-decay groups.

In one process (a DeepSpeed world of one on gloo), so it runs in seconds.
Run: .venv/bin/python -m pytest tests/test_zero_init.py -q
"""

import types

import pytest

MODEL = "configs/models/tiny_gpt2.json"
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


@pytest.fixture
def ds(ds_world, monkeypatch):
    """zero.Init reads LOCAL_RANK & co.: set for this test only."""
    for k, v in ds_world.items():
        monkeypatch.setenv(k, v)


def build(seed: int, sharded: bool):
    """build_causal_lm from the tiny config, under zero.Init when `sharded` (transformers sees a ZeRO-3 config)."""
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from dsrecipes.train.models import build_causal_lm

    ds_ref = HfDeepSpeedConfig(dict(DS_CONFIG)) if sharded else None  # noqa: F841 - transformers keeps a weak ref
    torch.manual_seed(seed)
    model = build_causal_lm(types.SimpleNamespace(model_name_or_path=None, model_config=MODEL))
    del ds_ref
    return model


def full_state(model) -> dict:
    """name -> full (gathered) tensor copy."""
    import deepspeed

    params = dict(model.named_parameters())
    sharded = [p for p in params.values() if hasattr(p, "ds_id")]
    if not sharded:
        return {n: p.detach().clone() for n, p in params.items()}
    with deepspeed.zero.GatheredParameters(sharded):
        return {n: p.detach().clone() for n, p in params.items()}


def group_names(model, weight_decay=0.1):
    from dsrecipes.train.optimizers import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in param_groups(model, weight_decay)]


def test_zero_init_really_shards(ds):
    model = build(0, sharded=True)
    p = model.transformer.wte.weight
    assert hasattr(p, "ds_id") and p.numel() == 0 and len(p.ds_shape) == 2


def test_weight_decay_groups_are_the_same_under_zero_init(ds):
    plain, sharded = group_names(build(0, sharded=False)), group_names(build(0, sharded=True))
    assert sharded == plain
    decay = dict(plain)[0.1]
    assert "transformer.wte.weight" in decay and "transformer.h.0.attn.c_attn.weight" in decay
    assert not any(n.endswith(".bias") or "ln_" in n for n in decay)


def test_zero_init_builds_the_same_weights(ds):
    import torch

    plain, sharded = full_state(build(1234, sharded=False)), full_state(build(1234, sharded=True))
    assert plain.keys() == sharded.keys()
    for name in plain:
        assert torch.equal(plain[name], sharded[name]), name
    # A real init (GPT-2's std 0.02, residual projections scaled down), not torch's defaults, and the seed matters.
    std = plain["transformer.wte.weight"].std().item()
    assert 0.015 < std < 0.025
    assert plain["transformer.h.0.attn.c_proj.weight"].std().item() < 0.8 * std
    other = full_state(build(1235, sharded=False))
    assert not torch.equal(other["transformer.wte.weight"], plain["transformer.wte.weight"])


def test_the_build_leaves_the_rng_as_it_was(ds):
    import torch

    after = []
    for sharded in (False, True):
        build(7, sharded)
        after.append(torch.rand(4))
    torch.manual_seed(7)
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], torch.rand(4))
