"""Llama-family tiny models (configs/models/tiny_llama*.json, tiny_qwen2.json) through recipes/train_lm.py with
2 processes: ZeRO 0-3 (and zero.Init), every activation-checkpointing mode, 8-bit optimizers (bitsandbytes and
torchao), static and progressive freezing with the prefix cache, and the exported final/ model.

Techniques are combined into few launches (each 1-3 minutes on 2 busy cores): the ZeRO-0 run without
checkpointing is the reference that ZeRO 1/2/3 runs, each with another checkpointing mode, must reproduce.

Run: .venv/bin/python -m pytest tests/test_llama_family.py -q
"""

import os

import pytest
import torch

from conftest import ROOT, launch_cmd, read_jsonl, run, summary, tiny_run, train_curve

LLAMA = "configs/models/tiny_llama.json"
UNTIED = "configs/models/tiny_llama_untied.json"
QWEN2 = "configs/models/tiny_qwen2.json"
STEPS = 8
COMMON = tiny_run(save_steps=8)
# name -> (model config, DeepSpeed JSON, extra args, zero3_init_flag)
RUNS = {
    "zero0": (LLAMA, "zero0", [], False),
    "zero1_full": (LLAMA, "zero1", ["--gradient_checkpointing", "full"], False),
    "zero2_every_k": (LLAMA, "zero2", ["--gradient_checkpointing", "every_k", "--checkpoint_every_k", "2"], False),
    "zero3_deepspeed": (LLAMA, "zero3_actckpt", ["--gradient_checkpointing", "deepspeed"], False),
    "zero3_init": (LLAMA, "zero3", [], True),
    "untied_8bit_static": (
        UNTIED,
        "zero2",
        ["--optimizer", "adamw_8bit", "--freeze_first_n_blocks", "1", "--freeze_embeddings", "true"],
        False,
    ),
    "qwen2_torchao": (QWEN2, "zero0", ["--optimizer", "torchao_adamw_8bit"], False),
}
PROGRESSIVE = [  # the short progressive run of tests/test_freezing_recipes.py, on Qwen2
    "--config",
    "configs/recipes/freeze_tiny_progressive.yaml",
    "--model_config",
    QWEN2,
    "--max_steps",
    "12",
    "--logging_steps",
    "1",
    "--eval_steps",
    "100",
    "--save_steps",
    "100",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "12",
    "--eval_docs",
    "20",
    "--warmup_steps",
    "2",
    "--freeze_start",
    "0.2",
    "--freeze_end",
    "0.5",
    "--freeze_cache",
    "memory",
]
_runs: dict = {}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("llama_family"))


def train(tmp_root, name: str) -> str:
    if name not in _runs:
        out = os.path.join(tmp_root, name)
        if name == "qwen2_progressive":
            cmd = launch_cmd(
                "recipes/train_lm.py", PROGRESSIVE + ["--output_dir", out], deepspeed="configs/deepspeed/zero2.json"
            )
        else:
            model, ds, extra, init_flag = RUNS[name]
            kw = {}
            if init_flag:
                with open(os.path.join(ROOT, "configs/accelerate/deepspeed_cpu_2proc.yaml")) as fh:
                    text = fh.read()
                assert "zero3_init_flag: false" in text
                kw["accelerate_config"] = os.path.join(tmp_root, "deepspeed_cpu_zero3_init.yaml")
                with open(kw["accelerate_config"], "w") as fh:
                    fh.write(text.replace("zero3_init_flag: false", "zero3_init_flag: true"))
            cmd = launch_cmd(
                "recipes/train_lm.py",
                COMMON + ["--model_config", model, "--output_dir", out, *extra],
                deepspeed=f"configs/deepspeed/{ds}.json",
                num_processes=2,
                **kw,
            )
        run(cmd, timeout=900)
        _runs[name] = out
    return _runs[name]


def eval_losses(output_dir: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r["eval_loss"]) for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl")) if "eval_loss" in r
    ]


def close(curve, ref, rel=1e-5) -> bool:
    return len(curve) == len(ref) and all(abs(a[1] - b[1]) <= rel * abs(b[1]) for a, b in zip(curve, ref))


# ---------------------------------------------------------------------------- in process (fast)
def build(path, seed=0):
    import types

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import build_causal_lm

    torch.manual_seed(seed)
    return build_causal_lm(types.SimpleNamespace(model_name_or_path=None, model_config=path), byte_tokenizer())


@pytest.mark.parametrize(
    "path,kv_heads,tied,bias",
    [(LLAMA, 2, True, False), (UNTIED, 2, False, False), (QWEN2, 1, True, True)],
)
def test_configs_build_the_family_and_decoder_parts_find_it(path, kv_heads, tied, bias):
    from dsrecipes.train.models import count_parameters, decoder_parts

    model = build(path)
    c = model.config
    assert c.vocab_size == 257 and c.num_hidden_layers == 4 and c.hidden_size == 128
    assert c.num_key_value_heads == kv_heads < c.num_attention_heads == 4 and c.hidden_act == "silu"
    parts = decoder_parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert parts["blocks"] is model.model.layers and len(parts["blocks"]) == 4
    assert [names[id(m)] for m in parts["embeddings"]] == ["model.embed_tokens"]  # RoPE: no position table
    assert names[id(parts["final_norm"])] == "model.norm" and type(parts["final_norm"]).__name__.endswith("RMSNorm")
    assert parts["tied"] is tied and (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (kv_heads * 32, 128) and (attn.q_proj.bias is not None) is bias
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) and 0.5e6 < n < 1e6
    # init_by_name: the same seed gives the same weights, whatever the RNG drew before the build
    torch.randn(1000)
    again = build(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    gpt2 = decoder_parts(build("configs/models/tiny_gpt2.json"))  # the GPT-2 view is unchanged
    assert len(gpt2["blocks"]) == 4 and len(gpt2["embeddings"]) == 2 and gpt2["tied"]


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # DeepSpeed's comm setup (ds_world) takes over 20 s on a busy machine
@pytest.mark.parametrize("path", [LLAMA, QWEN2])
def test_every_checkpointing_mode_recomputes_llama_blocks_exactly(ds_world, monkeypatch, path):
    import types

    from dsrecipes.memory.activation_checkpointing import apply_activation_checkpointing

    for k, v in ds_world.items():
        monkeypatch.setenv(k, v)
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(build(path).train(), ids)
    cases = [("full", False, 0), ("full", True, 0), ("every_k", False, 2), ("every_k", True, 3), ("deepspeed", 1, 0)]
    for mode, reentrant, k in cases:
        args = types.SimpleNamespace(
            gradient_checkpointing=mode,
            gradient_checkpointing_reentrant=bool(reentrant),
            checkpoint_every_k=k,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
        )
        model = build(path).train()
        ds = {"activation_checkpointing": {}} if mode == "deepspeed" else None
        info = apply_activation_checkpointing(model, args, None, ds)
        assert info["mode"] == mode
        loss, grads = _loss_and_grads(model, ids)
        assert abs(loss - ref_loss) <= 1e-6, (mode, reentrant, loss, ref_loss)
        assert grads.keys() == ref_grads.keys(), (mode, reentrant)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{mode}/{reentrant}: {name}")


def test_static_freezing_and_prefix_cache_on_llama():
    import types

    from dsrecipes.freezing.freezer import apply_static_freezing, frozen_prefix_depth
    from dsrecipes.freezing.prefix_cache import PrefixCache

    model = build(UNTIED).train()
    args = types.SimpleNamespace(freeze_first_n_blocks=2, freeze_embeddings=True, freeze_patterns=[])
    frozen = apply_static_freezing(model, args)
    blocks = sum(p.numel() for blk in model.model.layers[:2] for p in blk.parameters())
    assert frozen == 257 * 128 + blocks and model.lm_head.weight.requires_grad  # the untied head still trains
    assert frozen_prefix_depth(model) == 2
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    cache = PrefixCache(model, "memory")
    cache.activate(2)
    assert cache.off_reason is None and cache.depth == 2
    for expect_hits in (0, 4):  # a miss stores block 1's output; the second pass skips embeddings + 2 blocks
        loss, grads = _loss_and_grads(model, ids)
        assert cache.hits == expect_hits and abs(loss - ref_loss) <= 1e-6, (cache.stats(), loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and "model.layers.2.self_attn.q_proj.weight" in grads
        assert all(torch.allclose(grads[k], ref_grads[k], atol=1e-6) for k in grads)
    assert cache.stats()["entries"] == 4
    cache.close()


def test_a_model_without_decoder_blocks_is_refused_in_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsrecipes.config.errors import ConfigError
    from dsrecipes.train.models import decoder_parts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(
                "llama", num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=2
            )
        )
    model.model.layers = torch.nn.Sequential(*model.model.layers)  # not a ModuleList: no blocks to find
    with pytest.raises(ConfigError) as exc:
        decoder_parts(model)
    assert "\n" not in str(exc.value) and "cannot find the transformer blocks of LlamaForCausalLM" in str(exc.value)


# ---------------------------------------------------------------------------- ZeRO 0-3 x checkpointing modes
@pytest.mark.slow
def test_llama_zero_stages_and_checkpointing_modes_give_the_reference_curve(tmp_root):
    ref = train_curve(train(tmp_root, "zero0"))
    assert len(ref) == STEPS and ref[-1][1] < 0.8 * ref[0][1], ref
    s0 = summary(_runs["zero0"])
    assert s0["activation_checkpointing"]["mode"] == "none" and s0["world_size"] == 2 and s0["zero_stage"] == 0
    for name, mode, stage in (
        ("zero1_full", "full", 1),
        ("zero2_every_k", "every_k", 2),
        ("zero3_deepspeed", "deepspeed", 3),
    ):
        curve = train_curve(train(tmp_root, name))
        # Same data; recomputation is exact and the partitioned reductions only reorder sums (last-bit noise).
        assert [d for _, _, d in curve] == [d for _, _, d in ref], name
        assert close(curve, ref), (name, curve, ref)
        s = summary(_runs[name])
        assert s["status"] == "completed" and s["zero_stage"] == stage and s["world_size"] == 2
        ac = s["activation_checkpointing"]
        assert ac["mode"] == mode, ac
        if mode == "every_k":
            assert ac["every_k"] == 2 and ac["segments"] == 2
        else:
            assert ac["checkpointed_blocks"] == 4
    # Built sharded under zero.Init: init_by_name gives the same weights (RMSNorm, rotary buffers included).
    sharded = train(tmp_root, "zero3_init")
    assert close(train_curve(sharded), ref), (train_curve(sharded), ref)
    assert summary(sharded)["zero_stage"] == 3 and summary(sharded)["params"] == s0["params"]
    assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(eval_losses(sharded), eval_losses(_runs["zero3_deepspeed"])))


# ---------------------------------------------------------------------------- 8-bit optimizers, static freezing
@pytest.mark.slow
def test_untied_llama_adamw_8bit_with_static_freezing(tmp_root):
    out = train(tmp_root, "untied_8bit_static")
    s = summary(out)
    curve = train_curve(out)
    assert s["status"] == "completed" and s["optimizer"] == "adamw_8bit" and s["zero_stage"] == 2
    assert curve[-1][1] < 0.9 * curve[0][1], curve
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert model.config.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    # embed_tokens (257 x 128) + block 0 are frozen; the untied head keeps training.
    block0 = sum(p.numel() for p in model.model.layers[0].parameters())
    assert s["frozen_params"] == 257 * 128 + block0, (s["frozen_params"], block0)


@pytest.mark.slow
def test_qwen2_torchao_8bit_under_zero0(tmp_root):
    out = train(tmp_root, "qwen2_torchao")
    s, curve = summary(out), train_curve(out)
    assert s["status"] == "completed" and s["optimizer"] == "torchao_adamw_8bit" and s["zero_stage"] == 0
    assert len(curve) == STEPS and curve[-1][1] < 0.9 * curve[0][1], curve


# ---------------------------------------------------------------------------- progressive freezing + prefix cache
@pytest.mark.slow
def test_qwen2_progressive_freezing_with_prefix_cache(tmp_root):
    s = summary(train(tmp_root, "qwen2_progressive"))
    fz = s["freezing"]
    ev = fz["events"]
    assert [e["step"] for e in ev] == fz["planned_steps"] == [2, 4, 6]
    assert all(e["optimizer_params_after"] < e["optimizer_params_before"] for e in ev)
    assert fz["frozen_weights_unchanged"] is True
    assert fz["cache"]["hits"] > 0 and fz["cache"]["off_reason"] is None and fz["cache"]["depth"] == 3, fz["cache"]
    trainable = s["params"] - s["frozen_params"]
    assert abs(ev[-1]["optimizer_params_after"] * 2 - trainable) <= 128, (ev[-1], trainable)


# ---------------------------------------------------------------------------- exported model
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3_deepspeed", "untied_8bit_static"])
def test_llama_final_model_loads_and_gives_the_run_eval_loss(tmp_root, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets

    out = train(tmp_root, name)
    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    tok = AutoTokenizer.from_pretrained(final)
    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, eval_ds, _ = build_lm_datasets(args, tok)
    with torch.no_grad():
        losses = [
            model(input_ids=eval_ds[i : i + 16]["input_ids"], labels=eval_ds[i : i + 16]["labels"]).loss
            * len(eval_ds[i : i + 16]["input_ids"])
            for i in range(0, len(eval_ds), 16)
        ]
    loss = float(sum(losses) / len(eval_ds))
    assert abs(loss - summary(out)["final_eval_loss"]) < 1e-4, (loss, summary(out)["final_eval_loss"])
