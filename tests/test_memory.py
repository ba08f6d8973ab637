"""Memory recipes: activation checkpointing (HF full, every_k segments, DeepSpeed's API and its knobs), what
dsrecipes.memory measures (activations, per-rank model states under ZeRO 0-3), 8-bit/4-bit optimizers, bf16/fp16,
and the one-line refusals, in process with a tiny GPT-2. The real `accelerate launch` runs of the same techniques
are in tests/test_memory_recipes.py.

Run: .venv/bin/python -m pytest tests/test_memory.py -q
"""

import json
import os
import types

import pytest
import torch

from conftest import ROOT
from dsrecipes.config import check
from dsrecipes.config.errors import ConfigError
from dsrecipes.memory import activation_checkpointing, measure

KNOBS = (
    "partition_activations",
    "contiguous_memory_optimization",
    "cpu_checkpointing",
    "number_checkpoints",
    "synchronize_checkpoint_boundary",
    "profile",
)


@pytest.fixture
def ds_comm(ds_world, monkeypatch):
    """deepspeed.checkpointing and deepspeed.initialize need ds_world and its variables (for this test only).
    ZeRO-3's engine replaces torch.nn.functional.linear process-wide ("persists unless manually reset"; torchao's
    int8 tensors then fail on aten.t in later tests): put it back after each test."""
    import torch.nn.functional as F

    for k, v in ds_world.items():
        monkeypatch.setenv(k, v)
    linear = F.linear
    yield
    F.linear = linear


def tiny_model(layers=4, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=layers, n_embd=64, n_head=4, vocab_size=257, n_positions=64, bos_token_id=0, eos_token_id=0
    )  # dropout 0.1 everywhere: recompute must replay the same masks
    model = GPT2LMHeadModel(cfg)
    model.train()
    return model


def ckpt_args(mode="none", **kw):
    return types.SimpleNamespace(
        **{
            "gradient_checkpointing": mode,
            "gradient_checkpointing_reentrant": False,
            "checkpoint_every_k": 0,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            **kw,
        }
    )


def gpu_accelerator(ds_config):
    """What apply_activation_checkpointing reads from an Accelerator, as on a GPU machine (configure() itself
    touches no device), to show the knobs CPU runs may not use still reach DeepSpeed."""
    return types.SimpleNamespace(
        device=torch.device("cuda"),
        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=ds_config)),
    )


def loss_grads_and_saved(args, ds_config=None):
    model = tiny_model()
    info = activation_checkpointing.apply_activation_checkpointing(model, args, None, ds_config)
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with measure.SavedActivations(model) as acts:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, acts.bytes, info


# ---------------------------------------------------------------------------- checkpointing = same numbers
CASES = {
    "full": (ckpt_args("full"), None),
    "full_reentrant": (ckpt_args("full", gradient_checkpointing_reentrant=True), None),
    "every_k": (ckpt_args("every_k"), None),
    "every_k_reentrant_k3": (ckpt_args("every_k", checkpoint_every_k=3, gradient_checkpointing_reentrant=True), None),
    "deepspeed": (ckpt_args("deepspeed"), {"activation_checkpointing": {}}),
    "deepspeed_partition_contiguous": (
        ckpt_args("deepspeed"),
        {
            "activation_checkpointing": {
                "partition_activations": True,
                "contiguous_memory_optimization": True,
                "number_checkpoints": 4,
                "synchronize_checkpoint_boundary": True,
            }
        },
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointing_gives_the_same_loss_and_gradients(ds_comm, case):
    ref_loss, ref_grads, ref_saved, _ = loss_grads_and_saved(ckpt_args())
    loss, grads, saved, info = loss_grads_and_saved(*CASES[case])
    assert info["mode"] == CASES[case][0].gradient_checkpointing
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{case}: gradient of {name}")
    assert saved * 5 < ref_saved, (case, saved, ref_saved)  # recomputation keeps far less for backward


def test_every_k_keeps_one_input_per_segment(ds_comm):
    _, _, full, _ = loss_grads_and_saved(ckpt_args("full"))
    _, _, k1, info1 = loss_grads_and_saved(ckpt_args("every_k", checkpoint_every_k=1))
    _, _, k2, info2 = loss_grads_and_saved(ckpt_args("every_k"))
    block_input = 2 * 64 * 64 * 4  # batch x seq x hidden x fp32
    assert info1["segments"] == 4 and info2 == {"mode": "every_k", "reentrant": False, "every_k": 2, "segments": 2}
    assert k1 == full and full - k2 == 2 * block_input  # 4 kept inputs -> 2
    assert [activation_checkpointing.default_every_k(n) for n in (1, 4, 12, 24, 48)] == [1, 2, 3, 5, 7]
    with pytest.raises(ConfigError, match="checkpoint_every_k: 5 is not between 1 and the 4 blocks"):
        activation_checkpointing.apply_activation_checkpointing(
            tiny_model(), ckpt_args("every_k", checkpoint_every_k=5)
        )


# ---------------------------------------------------------------------------- DeepSpeed's knobs arrive
def test_every_deepspeed_knob_reaches_deepspeed(ds_comm):
    import deepspeed

    with open(os.path.join(ROOT, "configs/deepspeed/zero3_actckpt_gpu.json")) as fh:
        gpu = json.load(fh)
    section = gpu["activation_checkpointing"]
    assert set(section) == set(KNOBS) and section["cpu_checkpointing"] and section["partition_activations"]
    info = activation_checkpointing.apply_activation_checkpointing(
        tiny_model(), ckpt_args("deepspeed"), gpu_accelerator(gpu)
    )
    state = activation_checkpointing.deepspeed_checkpointing_state()
    assert info["deepspeed"] == state == {k: section[k] for k in KNOBS}
    assert deepspeed.checkpointing.CPU_CHECKPOINT is True and deepspeed.checkpointing.num_layers == 12
    # every knob the other way round, so none is a leftover of the call above
    flipped = {
        "partition_activations": False,
        "contiguous_memory_optimization": False,
        "cpu_checkpointing": False,
        "number_checkpoints": 7,
        "synchronize_checkpoint_boundary": True,
        "profile": True,
    }
    activation_checkpointing.apply_activation_checkpointing(
        tiny_model(), ckpt_args("deepspeed"), gpu_accelerator({"activation_checkpointing": flipped})
    )
    assert activation_checkpointing.deepspeed_checkpointing_state() == flipped
    # the shipped CPU configs arrive as written
    for name in ("zero2_actckpt.json", "zero3_actckpt.json"):
        with open(os.path.join(ROOT, "configs/deepspeed", name)) as fh:
            cfg = json.load(fh)
        activation_checkpointing.apply_activation_checkpointing(tiny_model(), ckpt_args("deepspeed"), None, cfg)
        got = activation_checkpointing.deepspeed_checkpointing_state()
        assert all(got[k] == v for k, v in cfg["activation_checkpointing"].items()), (name, got)


@pytest.mark.parametrize(
    "section,needle",
    [
        ({"cpu_checkpointing": True}, "activation_checkpointing.cpu_checkpointing: breaks on the CPU accelerator"),
        ({"contiguous_memory_optimization": True}, "contiguous_memory_optimization: needs partition_activations: true"),
        (
            {"partition_activations": True, "contiguous_memory_optimization": True, "number_checkpoints": 2},
            "number_checkpoints: must be at least the 4 checkpointed blocks",
        ),
    ],
)
def test_deepspeed_section_errors_are_one_line(ds_comm, section, needle):
    with pytest.raises(ConfigError) as exc:
        activation_checkpointing.apply_activation_checkpointing(
            tiny_model(), ckpt_args("deepspeed"), None, {"activation_checkpointing": section}
        )
    assert needle in exc.value.line() and "\n" not in exc.value.line()


def test_a_section_that_would_do_nothing_is_an_error():
    with pytest.raises(ConfigError, match="activation_checkpointing: has no effect with gradient_checkpointing: full"):
        activation_checkpointing.apply_activation_checkpointing(
            tiny_model(), ckpt_args("full"), None, {"activation_checkpointing": {"partition_activations": True}}
        )
    with pytest.raises(ConfigError, match="this run has no DeepSpeed config"):
        activation_checkpointing.apply_activation_checkpointing(
            tiny_model(),
            ckpt_args("deepspeed"),
            types.SimpleNamespace(device=torch.device("cpu"), state=types.SimpleNamespace(deepspeed_plugin=None)),
        )


# ---------------------------------------------------------------------------- low-bit optimizer state
def build_opt(model, name):
    from dsrecipes.train.optimizers import build_optimizer

    return build_optimizer(
        model,
        types.SimpleNamespace(
            optimizer=name, learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8
        ),
    )


def one_step(model, opt):
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_8bit_and_4bit_state_is_really_low_bit():
    sizes = {}
    for name in ("adamw", "adamw_8bit", "torchao_adamw_8bit", "torchao_adamw_4bit"):
        model = tiny_model()
        opt = build_opt(model, name)
        one_step(model, opt)
        sizes[name] = measure.model_state_bytes(model, opt)["optimizer_states"]
        if name == "adamw_8bit":  # bitsandbytes: uint8 codes + one fp32 absmax per 256 values, for every tensor
            for st in opt.state.values():
                assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
                assert st["absmax1"].dtype == torch.float32
        elif name.startswith("torchao"):  # tensor subclasses whose inner codes are uint8 (4-bit: two per byte)
            big = [st for p, st in opt.state.items() if p.numel() >= 4096 and p.numel() % 256 == 0]
            assert big and all(st["exp_avg"].codes.dtype == torch.uint8 for st in big)
    assert sizes["adamw_8bit"] <= 0.26 * sizes["adamw"], sizes
    assert sizes["torchao_adamw_4bit"] < sizes["torchao_adamw_8bit"] < 0.5 * sizes["adamw"], sizes


def test_paged_8bit_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    with pytest.raises(ConfigError, match="paged_adamw_8bit pages optimizer state through CUDA"):
        build_opt(tiny_model(), "paged_adamw_8bit")


# ---------------------------------------------------------------------------- per-rank model states under ZeRO
@pytest.mark.parametrize(
    "stage,optimizer,per_param",
    [
        (0, "adamw", 16),
        (1, "adamw", 20),
        (2, "adamw", 20),
        (3, "adamw", 20),
        (2, "adamw_8bit", 14),
        (3, "adamw_8bit", 14),
    ],
)
def test_model_states_read_from_the_engine(ds_comm, stage, optimizer, per_param):
    """One rank: fp32 params 4 + grads 4 + Adam 8 (+ DeepSpeed's fp32 master partition 4 under ZeRO >= 1) bytes per
    parameter; 8-bit: the two Adam states shrink to ~2 bytes. The ZeRO-3 run proves bitsandbytes works there."""
    import deepspeed

    model = tiny_model(layers=2)
    opt = build_opt(model, optimizer)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 4096,
            "stage3_prefetch_bucket_size": 4096,
            "stage3_param_persistence_threshold": 0,
        },
    }
    engine, dopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    probe = measure.StepProbe(engine, dopt)
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        with probe.first_micro_batch():
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    at = probe.result["at_step"]
    assert at["parameters"] == 4 * psi and at["gradients"] == pytest.approx(4 * psi, abs=64)  # + a few scalars
    assert at["master_weights"] == (4 * psi if stage else 0)
    assert at["model_states"] / psi == pytest.approx(per_param, rel=0.02), at
    assert probe.result["activation_bytes_per_micro_batch"] > 0 and losses[-1] < losses[0]
    if optimizer == "adamw_8bit":
        assert {st[k].dtype for st in opt.state.values() for k in ("state1", "state2")} == {torch.uint8}


def test_lint_rules_for_low_bit_optimizers(tmp_path):
    def lint(stage, optimizer, offload=False):
        zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
        ds, rec = tmp_path / "ds.json", tmp_path / "r.yaml"
        ds.write_text(json.dumps({"zero_optimization": zero}))
        rec.write_text(f"optimizer: {optimizer}\n")
        return [e.line() for e in check.lint_files(deepspeed=str(ds), recipe=str(rec))]

    assert lint(3, "adamw_8bit") == [] and lint(2, "paged_adamw_8bit") == [] and lint(0, "torchao_adamw_4bit") == []
    out = lint(2, "torchao_adamw_8bit")
    assert len(out) == 1 and "optimizer: torchao_adamw_8bit keeps fp32 state under ZeRO-2" in out[0]
    out = lint(2, "adamw_8bit", offload=True)
    assert len(out) == 1 and "adamw_8bit cannot be offloaded" in out[0]
