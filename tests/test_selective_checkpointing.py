"""The two selective recomputation modes (dsrecipes.memory.activation_checkpointing), in process:

- layer_selective checkpoints blocks 0, k, 2k, ... and keeps the other blocks' activations;
- selective_ops checkpoints every block but keeps matmul and attention outputs, recomputing the pointwise ops.

Both give the loss and gradients of no checkpointing (dropout on: the recompute replays the same masks), on GPT-2
and on the Llama config (RoPE, RMSNorm, SwiGLU, GQA); the bytes kept for backward fall between full and none.

Run: .venv/bin/python -m pytest tests/test_selective_checkpointing.py -q
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from conftest import ROOT
from dsrecipes.config.errors import ConfigError
from dsrecipes.memory import activation_checkpointing, measure

LAYERS, SEQ, BATCH = 6, 64, 2


def _model(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = {"gpt2": "configs/models/tiny_gpt2.json", "llama": "configs/models/tiny_llama.json"}[family]
    cfg = AutoConfig.from_pretrained(os.path.join(ROOT, path))
    cfg.num_hidden_layers = LAYERS
    if family == "gpt2":
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.1
    else:
        cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model


def _args(mode="none", **kw):
    base = {"gradient_checkpointing": mode, "gradient_checkpointing_reentrant": False, "checkpoint_every_k": 0}
    return types.SimpleNamespace(**{**base, **kw})


def _run(family, args):
    model = _model(family)
    info = activation_checkpointing.apply_activation_checkpointing(model, args)
    ids = torch.randint(0, 257, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with measure.SavedActivations(model) as acts:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, acts.bytes, info


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def runs(request):
    family = request.param
    cases = {
        "none": _args(),
        "full": _args("full"),
        "layer_k2": _args("layer_selective"),
        "layer_k3": _args("layer_selective", checkpoint_every_k=3),
        "ops": _args("selective_ops"),
    }
    return family, {name: _run(family, a) for name, a in cases.items()}


@pytest.mark.parametrize("case", ["layer_k2", "layer_k3", "ops"])
def test_selective_modes_give_the_loss_and_gradients_of_no_checkpointing(runs, case):
    family, out = runs
    ref_loss, ref_grads, _, _ = out["none"]
    loss, grads, _, _ = out[case]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{family} {case}: gradient of {name}")


def test_layer_selective_checkpoints_every_kth_block_and_keeps_the_rest(runs):
    family, out = runs
    none, full = out["none"][2], out["full"][2]
    k2, k3 = out["layer_k2"], out["layer_k3"]
    assert k2[3]["blocks"] == [0, 2, 4] and k3[3]["blocks"] == [0, 3]
    assert k2[3]["checkpointed_blocks"] == 3 and k3[3]["every_k"] == 3
    # each checkpointed block keeps only its input instead of its activations: bytes fall linearly with the
    # fraction checkpointed, from none (fraction 0) towards full (fraction 1)
    per_block = (none - full) / LAYERS
    for saved, n_ckpt in ((k2[2], 3), (k3[2], 2)):
        assert full < saved < none, (family, saved, full, none)
        assert abs((none - saved) - n_ckpt * per_block) <= 0.02 * none, (family, saved, n_ckpt, per_block)


def test_selective_ops_keeps_matmul_outputs_and_recomputes_the_rest(runs):
    family, out = runs
    none, full, ops = out["none"][2], out["full"][2], out["ops"][2]
    info = out["ops"][3]
    assert info["checkpointed_blocks"] == LAYERS and "mm" in info["saved_ops"]
    assert full < ops < none, (family, full, ops, none)  # more than the inputs alone, less than everything


def test_selective_modes_refuse_bad_settings():
    with pytest.raises(ConfigError, match="checkpoint_every_k: 7 is not between 1 and the 6 blocks"):
        activation_checkpointing.apply_activation_checkpointing(
            _model("gpt2"), _args("layer_selective", checkpoint_every_k=7)
        )
    with pytest.raises(ConfigError, match="gradient_checkpointing_reentrant: selective_ops needs non-reentrant"):
        activation_checkpointing.apply_activation_checkpointing(
            _model("gpt2"), _args("selective_ops", gradient_checkpointing_reentrant=True)
        )


@pytest.mark.parametrize("k", [2, 3])
def test_the_planner_gives_layer_selective_bytes(k):
    """The planner's layer_selective figure against saved-tensor hooks (tiny GPT-2, sdpa, dropout, fp32, CPU), as
    tests/test_planner.py checks none and full."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.memory.model_spec import spec_from_config
    from dsrecipes.memory.planner import plan_memory
    from dsrecipes.train.models import load_model_config

    config = load_model_config(os.path.join(ROOT, "configs/models/tiny_gpt2.json"))
    config.vocab_size, config.n_layer = 257, LAYERS
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    activation_checkpointing.apply_activation_checkpointing(model, _args("layer_selective", checkpoint_every_k=k))
    ids = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(0))
    with measure.SavedActivations(model) as acts:
        model(input_ids=ids, labels=ids).loss.backward()

    def plan(every_k):
        return plan_memory(
            spec_from_config(config, "tiny", None),
            micro_batch=4,
            seq_len=64,
            precision="fp32",
            device="cpu",
            checkpointing="layer_selective",
            every_k=every_k,
        )

    got = plan(k)
    assert got["detail"]["activations_saved_forward"] == pytest.approx(acts.bytes, rel=0.01), (k, acts.bytes)
    assert got["detail"]["every_k"] == k
    # a checkpointed block is recomputed after the blocks behind it freed their activations, so the recompute adds
    # to the peak only when the last block (5 of 0..5) is checkpointed: k = 5 here, not k = 2 or 3
    assert got["detail"]["activations_recompute"] == 0
    last = plan(5)["detail"]
    assert last["activations_recompute"] == last["activation_per_layer"] > 0
