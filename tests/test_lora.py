"""LoRA and QLoRA (dsrecipes.train.lora) in recipes/train_lm.py: plain DDP and ZeRO 0/2/3 (zero3_init_flag too),
adapter-only checkpoints with exact resume, the merged and adapter-only exports, the server's loader, per-rank
state bytes against full fine-tuning, QLoRA (NF4) on the CPU, and the rules of what LoRA combines with.

Run: .venv/bin/python -m pytest tests/test_lora.py -q             (fast tests)
     .venv/bin/python -m pytest tests/test_lora.py -q -m slow     (5 two-process launches and 3 one-process runs)
"""

import glob
import os
import sys

import pytest
import torch

from conftest import ROOT, launch_cmd, read_jsonl, run, summary, tiny_run, torchrun_cmd, train_curve
from dsrecipes.config import compat_doc, rules

LORA_YAML = "configs/recipes/train_tiny_lora.yaml"  # tiny GPT-2, lora_r 8 on all-linear, lora_export both
LLAMA = "configs/models/tiny_llama.json"  # intermediate 344: not a multiple of 32 (see the QLoRA test)
GPT2 = "configs/models/tiny_gpt2.json"
_runs: dict = {}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora"))


def train(tmp_root, name: str, launcher: str, *extra, env=None, **flags) -> str:
    """One run of recipes/train_lm.py (LORA_YAML, conftest.tiny_run flags + `flags`), once per module: launcher is ddp
    (torchrun, 2 processes), z0/z2/z3/z3init (accelerate + DeepSpeed, 2 processes) or one (a plain process)."""
    if name in _runs:
        return _runs[name]
    out = os.path.join(tmp_root, name)
    args = tiny_run(LORA_YAML, output_dir=out, **flags) + list(extra)
    if launcher == "ddp":
        cmd, env = torchrun_cmd(2) + ["recipes/train_lm.py", *args], {"ACCELERATE_USE_CPU": "true", **(env or {})}
    elif launcher == "one":
        cmd = [sys.executable, "recipes/train_lm.py", *args]
    else:
        yaml_path = "configs/accelerate/deepspeed_cpu_2proc.yaml"
        if launcher == "z3init":  # the base is built sharded (deepspeed.zero.Init); the adapters are added after
            with open(os.path.join(ROOT, yaml_path)) as fh:
                text = fh.read().replace("zero3_init_flag: false", "zero3_init_flag: true")
            yaml_path = os.path.join(tmp_root, "zero3_init.yaml")
            with open(yaml_path, "w") as fh:
                fh.write(text)
        stage = {"z0": "zero0", "z2": "zero2", "z3init": "zero3"}[launcher]
        cmd = launch_cmd(
            "recipes/train_lm.py", args, accelerate_config=yaml_path, deepspeed=f"configs/deepspeed/{stage}.json"
        )
    run(cmd, timeout=900, **(env or {}))
    _runs[name] = out
    return out


def eval_loss_of(model, tok) -> float:
    """The recipe's eval loss (mean per-sequence loss over the tiny_run eval set) of a loaded model."""
    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets

    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, ev, _ = build_lm_datasets(args, tok)
    with torch.no_grad():
        batches = [ev[i : i + 16] for i in range(0, len(ev), 16)]
        losses = [model(input_ids=b["input_ids"], labels=b["labels"]).loss * len(b["input_ids"]) for b in batches]
    return float(sum(losses) / len(ev))


def base_model(config: str, tok):
    """The run's frozen base, rebuilt as the recipe builds it (seed 42, init by module name)."""
    from dsrecipes.config.args import ModelArguments, parse_args
    from dsrecipes.train.models import build_causal_lm

    args, _ = parse_args((ModelArguments,), ["--model_config", config])
    torch.manual_seed(42)
    return build_causal_lm(args, tok)


def check_exports(out: str, config: str) -> None:
    """final/ (merged) loads with plain from_pretrained and gives the run's eval loss; final_adapter/ loads onto the
    base with PeftModel.from_pretrained and gives it too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = summary(out)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "final"))
    assert abs(eval_loss_of(merged, tok) - s["final_eval_loss"]) < 1e-4
    adapter = PeftModel.from_pretrained(base_model(config, tok), os.path.join(out, "final_adapter")).eval()
    assert abs(eval_loss_of(adapter, tok) - s["final_eval_loss"]) < 1e-4


def checkpoint_bytes(out: str, step: int = 8) -> int:
    path = os.path.join(out, "checkpoints", f"step_{step:08d}")
    return sum(os.path.getsize(f) for f in glob.glob(f"{path}/**", recursive=True) if os.path.isfile(f))


def check_checkpoint(out: str, fp32_params: int | None = None) -> None:
    """The checkpoint holds the adapter (and its optimizer state), not the base: every saved weight is a LoRA
    tensor, and the whole checkpoint is smaller than the fp32 base weights alone (fp32_params: the model's
    parameter count unquantized; default the run's)."""
    s = summary(out)
    path = os.path.join(out, "checkpoints", "step_00000008")
    if os.path.isfile(os.path.join(path, "model.safetensors")):  # DDP / one process: accelerate's save hook
        from safetensors.torch import load_file

        keys = list(load_file(os.path.join(path, "model.safetensors")))
    else:  # DeepSpeed: save_checkpoint(exclude_frozen_parameters=True)
        states = glob.glob(f"{path}/pytorch_model/*model_states.pt")
        keys = [k for f in states for k in (torch.load(f, weights_only=False, map_location="cpu")["module"] or {})]
    assert keys and all("lora_" in k for k in keys), keys[:5]
    size, adapter = checkpoint_bytes(out), 4 * s["lora"]["adapter_params"]
    fp32_params = fp32_params or s["params"]
    assert 3 * adapter <= size < 0.5 * 4 * fp32_params, (size, adapter, fp32_params)


# ---------------------------------------------------------------------------- fast: targets, QLoRA on CPU, rules
def test_unknown_target_module_is_one_line_listing_the_models_modules():
    import argparse

    from dsrecipes.config.errors import ConfigError
    from dsrecipes.train import lora
    from dsrecipes.train.data import byte_tokenizer

    tok = byte_tokenizer()
    gpt2, llama = base_model(GPT2, tok), base_model(LLAMA, tok)
    assert lora.linear_names(gpt2) == ["c_attn", "c_fc", "c_proj"]
    assert lora.linear_names(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    args = argparse.Namespace(lora_r=8, lora_dropout=0.0, lora_target_modules=["q_proj"])
    with pytest.raises(ConfigError) as err:
        lora.check_args(gpt2, args, "r.yaml")
    line = err.value.line()
    assert "\n" not in line and line.startswith("error: r.yaml: lora_target_modules: ['q_proj'] not among")
    assert "['c_attn', 'c_fc', 'c_proj']" in line
    args.lora_target_modules = ["q_proj", "v_proj"]
    assert lora.check_args(llama, args, "r.yaml") == ["q_proj", "v_proj"]
    args.lora_target_modules = ["all-linear"]
    assert lora.check_args(gpt2, args, "r.yaml") == "all-linear"


def test_bnb_nf4_linear_forward_and_backward_run_on_cpu():
    """The smallest QLoRA reproduction: a bitsandbytes NF4 Linear4bit on the CPU computes close to its fp32 source
    and passes gradients to its input (so adapters upstream of it train)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state is not None  # packed 4-bit
    x = torch.randn(8, 64, requires_grad=True)
    y = q(x)
    err = (y - lin(x)).abs().max().item()
    assert 0 < err < 0.3 * lin(x).abs().max().item()  # quantized: not exact, but close
    y.sum().backward()
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.allclose(x.grad, torch.ones(8, 32) @ w, atol=1e-5)  # the gradient through the dequantized weight
    # eval, then train again, as the recipe does: with the AVX512-BF16 repacking off (dsrecipes.train.lora) eval
    # computes what training computes, and training still works after it
    q.support_avx512bf16_for_cpu = False
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x.detach()), y.detach())
    q.train()
    x2 = x.detach().clone().requires_grad_(True)
    q(x2).sum().backward()
    assert torch.equal(x2.grad, x.grad)


@pytest.mark.parametrize(
    "recipe, kind, refused_by",
    [
        ({"freeze_first_n_blocks": 1}, "train_lm", "lora_freezing"),
        ({"freeze_schedule": "linear"}, "train_lm", "lora_freezing"),
        ({"lora_quantize": "nf4", "zero": 3}, "train_lm", "qlora_zero3"),
    ],
)
def test_rules_refuse_lora_with(recipe, kind, refused_by):
    zero = recipe.pop("zero", 2)
    s = rules.settings_from({"lora_r": 8, **recipe}, {"zero_optimization": {"stage": zero}}, recipe_kind=kind)
    assert [r.id for r in rules.fired(s)] == [refused_by]
    err = rules.refusals(s, {"recipe": "r.yaml"})[0]
    assert "\n" not in err.line() and err.line().startswith("error: r.yaml: ")


@pytest.mark.parametrize("recipe", ["distill", "train_pipeline"])
def test_distill_and_pipeline_recipes_refuse_lora_keys(recipe):
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args(RECIPES[recipe], ["--lora_r", "8"])
    assert err.value.line().startswith("error: <cli>: --lora_r: unknown argument")


@pytest.mark.parametrize(
    "ds, recipe, rule_id",
    [
        ({"zero_optimization": {"stage": 2}}, {"lora_r": 8, "freeze_first_n_blocks": 1}, "lora_freezing"),
        ({"zero_optimization": {"stage": 3}}, {"lora_r": 8, "lora_quantize": "nf4"}, "qlora_zero3"),
    ],
)
def test_dsrecipes_check_refuses_with_exactly_the_table_line(tmp_path, ds, recipe, rule_id):
    """What tests/test_rules.py checks for every other rule: `dsrecipes check` gives the table's line, only it."""
    import json

    import yaml

    from dsrecipes.config.check import lint_files

    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    files = {"deepspeed": str(tmp_path / "ds.json"), "recipe": str(tmp_path / "r.yaml")}
    want = rules.BY_ID[rule_id].error(rules.settings_from(recipe, ds), files).line()
    assert [e.line() for e in lint_files(**files)] == [want]


def test_rules_let_lora_combine_with_zero_checkpointing_and_8bit():
    for stage in (0, 1, 2, 3):
        for ckpt, reentrant in (("none", False), ("full", True), ("full", False), ("every_k", False)):
            for opt in ("adamw", "adamw_8bit"):
                recipe = {"lora_r": 8, "gradient_checkpointing": ckpt, "gradient_checkpointing_reentrant": reentrant}
                s = rules.settings_from({**recipe, "optimizer": opt}, {"zero_optimization": {"stage": stage}})
                assert s.lora == "lora" and not rules.fired(s), (stage, ckpt, opt, rules.fired(s))
    assert rules.settings_from({"lora_r": 0}, {}).lora == "none"
    assert rules.settings_from({"lora_r": 4, "lora_quantize": "nf4"}, None).lora == "qlora"
    assert not rules.fired(rules.settings_from({"lora_r": 4, "lora_quantize": "nf4"}, None))  # QLoRA on DDP


def test_compat_doc_lora_rows_name_a_test_here_or_a_rule():
    names = {n for n in dir(sys.modules[__name__]) if n.startswith("test_")}
    for label, kind, text in compat_doc.lora_rows():
        if kind == "works":
            assert text.split("::")[-1].split("`")[0] in names, (label, text)
        elif kind == "refused" and "unknown key" not in text:  # distill/pipeline: test_distill_and_pipeline_...
            assert text.split("[")[-1].rstrip("]") in rules.BY_ID, (label, text)
    kinds = {label: kind for label, kind, _ in compat_doc.lora_rows()}
    assert kinds["static freeze"] == kinds["distillation student"] == kinds["QLoRA (NF4), ZeRO-3"] == "refused"


# ---------------------------------------------------------------------------- slow: the runs
@pytest.mark.slow
def test_ddp_lora_exports_merged_and_adapter_and_the_server_loads_it(tmp_root):
    from dsrecipes.config.args import ServeArguments, parse_args
    from dsrecipes.serve.loading import load_lm

    out = train(
        tmp_root, "ddp", "ddp", "--lora_target_modules", "all-linear", lora_r=8, lora_export="both",
        gradient_checkpointing="every_k",
    )  # fmt: skip
    s = summary(out)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["zero_stage"] is None
    assert s["lora"]["target_modules"] and s["lora"]["trainable_params"] == s["lora"]["adapter_params"] == 65536
    assert s["activation_checkpointing"]["mode"] == "every_k"
    curve = train_curve(out)
    assert len(curve) == 8 and curve[-1][1] < curve[0][1]
    check_exports(out, GPT2)
    check_checkpoint(out)
    # DDP: each rank holds the adapter's gradients (4 B) and AdamW's two moments (8 B) per adapter parameter
    at = s["memory"]["at_step"]
    assert at["gradients"] == 4 * 65536 and 8 * 65536 <= at["optimizer_states"] <= 8 * 65536 + 1024
    model, tok = load_lm(parse_args((ServeArguments,), ["--model_name_or_path", os.path.join(out, "final")])[0])
    prompt = tok("the ", return_tensors="pt").input_ids
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == prompt.shape[1] + 6


@pytest.mark.slow
def test_zero2_lora_preempted_and_resumed_equals_the_straight_run(tmp_root):
    flags = dict(lora_r=8, gradient_checkpointing="full")
    extra = ("--lora_target_modules", "c_attn", "c_fc")
    straight = train(tmp_root, "z2", "z2", *extra, **flags)
    pre = os.path.join(tmp_root, "z2_pre")
    train(tmp_root, "z2_pre", "z2", *extra, env={"DSRECIPES_FAULT_PREEMPT_AT": "3"}, **flags)
    assert summary(pre)["status"] == "preempted" and summary(pre)["steps"] == 3
    pre_ckpt = checkpoint_bytes(pre, 3)
    _runs.pop("z2_pre")
    train(tmp_root, "z2_pre", "z2", *extra, "--resume_from", "latest", **flags)
    assert train_curve(pre) == train_curve(straight)  # bit for bit, data order included
    assert summary(pre)["resumed_from"].endswith("step_00000003") and summary(pre)["status"] == "completed"
    rec = [r for r in read_jsonl(os.path.join(pre, "metrics.jsonl")) if "eval_loss" in r]
    assert rec == [r for r in read_jsonl(os.path.join(straight, "metrics.jsonl")) if "eval_loss" in r]
    check_checkpoint(straight)
    assert pre_ckpt == pytest.approx(checkpoint_bytes(straight), rel=0.05)


@pytest.mark.slow
def test_zero3_init_lora_reentrant_8bit_exports_gathered_weights(tmp_root):
    out = train(
        tmp_root, "z3init", "z3init", "--lora_target_modules", "q_proj", "v_proj", model_config=LLAMA, lora_r=8,
        lora_export="both", gradient_checkpointing="full", gradient_checkpointing_reentrant="true",
        optimizer="adamw_8bit",
    )  # fmt: skip
    s = summary(out)
    assert s["status"] == "completed" and s["zero_stage"] == 3 and s["optimizer"] == "adamw_8bit"
    assert s["lora"]["target_modules"] == ["q_proj", "v_proj"] and s["lora"]["adapter_params"] == 4 * 8 * (256 + 192)
    curve = train_curve(out)
    assert curve[-1][1] < curve[0][1]  # reentrant checkpointing over a frozen base still trains the adapters
    check_exports(out, LLAMA)
    check_checkpoint(out)


@pytest.mark.slow
def test_zero0_state_bytes_scale_with_the_adapter_not_the_model(tmp_root):
    """Per rank, ZeRO-0 fp32: gradients 4 B and AdamW state 8 B per trainable parameter. LoRA's figures over full
    fine-tuning's equal the adapter's parameter count over the model's."""
    lo = summary(train(tmp_root, "z0_lora", "z0", model_config=LLAMA, lora_r=8))
    full = summary(train(tmp_root, "z0_full", "z0", model_config=LLAMA, lora_r=0))
    assert lo["zero_stage"] == full["zero_stage"] == 0 and lo["params"] - full["params"] == lo["lora"]["adapter_params"]
    ratio = lo["lora"]["adapter_params"] / full["params"]
    a, b = lo["memory"]["at_step"], full["memory"]["at_step"]
    for kind in ("gradients", "optimizer_states"):
        assert a[kind] / b[kind] == pytest.approx(ratio, rel=0.02), (kind, a[kind], b[kind], ratio)
    curve = train_curve(_runs["z0_lora"])
    assert curve[-1][1] < curve[0][1]


@pytest.mark.slow
def test_qlora_nf4_one_process_resumes_exactly_and_exports_dequantized_merge(tmp_root):
    flags = dict(model_config=LLAMA, lora_r=8, lora_quantize="nf4", lora_export="both")
    straight = train(tmp_root, "qlora", "one", **flags)
    s = summary(straight)
    assert s["lora"]["quantized_linears"] == 4 * 7 and s["status"] == "completed"
    assert train_curve(straight)[-1][1] < train_curve(straight)[0][1]
    pre = os.path.join(tmp_root, "qlora_pre")
    train(tmp_root, "qlora_pre", "one", env={"DSRECIPES_FAULT_PREEMPT_AT": "5"}, **flags)
    assert summary(pre)["steps"] == 5
    _runs.pop("qlora_pre")
    train(tmp_root, "qlora_pre", "one", "--resume_from", "latest", **flags)
    assert train_curve(pre) == train_curve(straight)
    # merged = dequantized NF4 base + adapter: a plain fp32 model with the run's eval loss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(straight, "final")).eval()
    check_checkpoint(straight, fp32_params=sum(p.numel() for p in merged.parameters()))
    # the summary counts the NF4 weights by their logical shape, not their packed storage (half as many elements)
    assert s["params"] == sum(p.numel() for p in merged.parameters()) + s["lora"]["adapter_params"], s["lora"]
    tok = AutoTokenizer.from_pretrained(os.path.join(straight, "final"))
    assert abs(eval_loss_of(merged, tok) - s["final_eval_loss"]) < 1e-4
