"""Distillation: the loss against a hand computation, the student built from the teacher's layers, and
recipes/distill.py for real (plain, ZeRO-3-partitioned and init_inference teachers; 1 and 2 processes).

Run: .venv/bin/python -m pytest tests/test_distill.py -q      (fast tests in seconds; -m slow: about 2 minutes)
"""

import json
import math
import os
import sys

import pytest
import torch

from conftest import launch_cmd, read_jsonl, run, summary

DISTILL = "configs/recipes/distill_tiny_4to2.yaml"


# ---------------------------------------------------------------------------- the loss, by hand
def test_loss_equals_hand_computation():
    from dsrecipes.distill.distillation import distillation_loss

    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, 0.0, 0.0]]])  # [batch 1, seq 3, vocab 3]
    t = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[7, 1, -100]])  # position 0 predicts label[1] = 1; position 1 predicts -100 (ignored)
    hs, ht = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, 0.0]]]), torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    loss, terms = distillation_loss(
        s, t, labels, temperature=2.0, alpha_kd=0.3, alpha_ce=0.6, alpha_cos=0.1, s_hidden=hs, t_hidden=ht
    )

    def softmax(xs, temp):
        e = [math.exp(x / temp) for x in xs]
        return [v / sum(e) for v in e]

    # only position 0 counts: student [1, 0, -1], teacher [0, 1, 0], label 1
    ce = -math.log(softmax([1.0, 0.0, -1.0], 1)[1])
    p, q = softmax([0.0, 1.0, 0.0], 2), softmax([1.0, 0.0, -1.0], 2)
    kd = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * 2.0**2
    cos = 1 - (1 * 1 + 0 * 1) / (1 * math.sqrt(2))
    want = 0.3 * kd + 0.6 * ce + 0.1 * cos
    assert terms["ce"] == pytest.approx(ce, rel=1e-6) and terms["kd"] == pytest.approx(kd, rel=1e-6)
    assert terms["cos"] == pytest.approx(cos, rel=1e-6)
    assert loss.item() == pytest.approx(want, rel=1e-6) and terms["loss"] == pytest.approx(want, rel=1e-6)
    _, same = distillation_loss(t, t, labels, 2.0, 1.0, 0.0)
    assert same["kd"] == pytest.approx(0.0, abs=1e-7)  # a student equal to its teacher has no KD loss


def test_layer_map_takes_every_other_block():
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.distill.distillation import layer_map

    assert layer_map(8, 4) == [0, 2, 4, 6] and layer_map(4, 2) == [0, 2] and layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert layer_map(6, 4) == [0, 1, 3, 4]
    with pytest.raises(ConfigError, match="student_num_layers"):
        layer_map(4, 5)


# ---------------------------------------------------------------------------- a small trained teacher
def train_teacher(out_dir: str, steps: int = 30, model_config: str = "configs/models/tiny_gpt2_nodropout.json"):
    from transformers import AutoModelForCausalLM

    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets, byte_tokenizer
    from dsrecipes.train.models import load_model_config

    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(load_model_config(model_config, tok))
    args, _ = parse_args((DataArguments,), ["--generated_docs", "100", "--eval_docs", "20"])
    train_ds, eval_ds, _ = build_lm_datasets(args, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(steps):
        start = (i * 8) % (len(train_ds) - 8)
        batch = train_ds[start : start + 8]
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model.eval(), eval_ds


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher"))
    model, eval_ds = train_teacher(path)
    return path, model, eval_ds


def test_student_from_teacher_layers_starts_closer_than_scratch(teacher):
    import torch.nn.functional as F

    from dsrecipes.distill.distillation import student_from_teacher

    path, model, eval_ds = teacher
    near, mapping = student_from_teacher(model, 2, "teacher_layers")
    far, _ = student_from_teacher(model, 2, "scratch")
    assert mapping == [0, 2] and near.config.n_layer == far.config.n_layer == 2
    assert torch.equal(near.transformer.h[1].mlp.c_fc.weight, model.transformer.h[2].mlp.c_fc.weight)
    batch = eval_ds[:8]

    def kl_and_loss(student):
        with torch.no_grad():
            t = model(input_ids=batch["input_ids"]).logits
            out = student.eval()(input_ids=batch["input_ids"], labels=batch["labels"])
        kl = F.kl_div(F.log_softmax(out.logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        return kl.item() / batch["input_ids"].shape[1], out.loss.item()

    (kl_near, loss_near), (kl_far, loss_far) = kl_and_loss(near), kl_and_loss(far)
    assert kl_near < 0.5 * kl_far and loss_near < loss_far, (kl_near, kl_far, loss_near, loss_far)


def test_bad_teacher_is_one_line(tmp_path):
    proc = run(
        [
            sys.executable,
            "recipes/distill.py",
            "--config",
            DISTILL,
            "--teacher_name_or_path",
            "/nonexistent/t",
            "--output_dir",
            str(tmp_path / "o"),
            "--report_to",
            "none",
        ],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: <args>: teacher_name_or_path: cannot load '/nonexistent/t'"), proc.stderr[-1500:]


# ---------------------------------------------------------------------------- the recipe, for real
SHORT = [
    "--config",
    DISTILL,
    "--max_steps",
    "6",
    "--logging_steps",
    "2",
    "--eval_steps",
    "100",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "200",
    "--eval_docs",
    "20",
    "--warmup_steps",
    "2",
]


@pytest.mark.slow
def test_distill_two_processes_zero2_writes_student_and_compares_with_scratch(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "d")
    run(
        launch_cmd(
            "recipes/distill.py",
            SHORT + ["--teacher_name_or_path", teacher[0], "--output_dir", out],
            deepspeed="configs/deepspeed/zero2.json",
        ),
        timeout=600,
    )
    s = summary(out)
    assert s["world_size"] == 2 and s["zero_stage"] == 2 and s["layer_map"] == [0, 2]
    for who in ("teacher", "student", "scratch"):
        assert math.isfinite(s[who]["eval_loss"])
    assert s["student"]["eval_loss"] < s["scratch"]["eval_loss"]  # the teacher's layers and soft targets help
    assert s["quality_vs_teacher"] == pytest.approx(s["teacher"]["eval_ppl"] / s["student"]["eval_ppl"])
    logged = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("phase") == "distill" and "kd" in r]
    assert len(logged) == 3 and all({"kd", "ce", "cos", "loss", "lr"} <= set(r) for r in logged)
    r = logged[0]
    assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"] + 0.1 * r["cos"], rel=1e-4)
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")).config.n_layer == 2
    assert os.path.isfile(os.path.join(out, "scratch_final", "model.safetensors"))


@pytest.mark.slow
def test_distill_zero3_partitioned_teacher_two_processes(teacher, tmp_path):
    out = str(tmp_path / "z3")
    run(
        launch_cmd(
            "recipes/distill.py",
            SHORT
            + [
                "--teacher_name_or_path",
                teacher[0],
                "--output_dir",
                out,
                "--teacher_engine",
                "zero3",
                "--student_init",
                "scratch",
                "--scratch_baseline",
                "false",
            ],
            deepspeed="configs/deepspeed/zero2.json",
        ),
        timeout=600,
    )
    s = summary(out)
    full_bytes = 4 * s["teacher_params"]
    # each rank holds half of the teacher (ZeRO-3 partitions, padded), the student trains under ZeRO-2
    assert 0.45 * full_bytes < s["teacher_param_bytes_per_rank"] < 0.6 * full_bytes, s
    assert s["teacher_engine"] == "zero3" and s["zero_stage"] == 2 and s["scratch"] is None
    assert math.isfinite(s["teacher"]["eval_loss"]) and os.path.isdir(os.path.join(out, "final"))


@pytest.mark.slow
def test_distill_inference_engine_bf16_teacher_one_process(teacher, tmp_path):
    out = str(tmp_path / "inf")
    run(
        launch_cmd(
            "recipes/distill.py",
            SHORT
            + [
                "--teacher_name_or_path",
                teacher[0],
                "--output_dir",
                out,
                "--teacher_engine",
                "inference",
                "--teacher_dtype",
                "bfloat16",
                "--scratch_baseline",
                "false",
            ],
            deepspeed="configs/deepspeed/zero2.json",
            num_processes=1,
        ),
        timeout=600,
    )
    s = summary(out)
    assert s["world_size"] == 1 and s["teacher_dtype"] == "bfloat16"
    with open(os.path.join(out, "final", "config.json")) as fh:
        assert json.load(fh)["n_layer"] == 2
    assert s["teacher_param_bytes_per_rank"] == 2 * s["teacher_params"]  # bf16 teacher


# ---------------------------------------------------------------------------- Llama -> Llama
LLAMA_DISTILL = "configs/recipes/distill_tiny_llama.yaml"


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_teacher"))
    model, eval_ds = train_teacher(path, model_config="configs/models/tiny_llama.json", steps=30)
    return path, model, eval_ds


@pytest.mark.slow  # the teacher's 30 training steps take 20-90 s on 2 shared cores
def test_llama_student_from_teacher_layers_keeps_gqa_and_starts_close(llama_teacher):
    """The 2-layer student of the tiny Llama (GQA 4 heads / 2 KV heads, RMSNorm, RoPE, tied head) copies decoder
    layers 0 and 2, the embedding, final RMSNorm and head; it starts far nearer the teacher than a fresh one."""
    import torch.nn.functional as F

    from dsrecipes.distill.distillation import student_from_teacher

    _, model, eval_ds = llama_teacher
    near, mapping = student_from_teacher(model, 2, "teacher_layers")
    far, _ = student_from_teacher(model, 2, "scratch")
    c = near.config
    assert mapping == [0, 2] and c.model_type == "llama" and c.num_hidden_layers == len(near.model.layers) == 2
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert c.rope_parameters == model.config.rope_parameters
    t_layer, s_layer = model.model.layers[2], near.model.layers[1]
    assert s_layer.self_attn.k_proj.weight.shape == (64, 128)  # 2 KV heads x 32: grouped-query attention kept
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj", "input_layernorm"):
        assert torch.equal(s_layer.get_submodule(name).weight, t_layer.get_submodule(name).weight), name
    assert torch.equal(near.model.norm.weight, model.model.norm.weight)
    assert near.lm_head.weight.data_ptr() == near.model.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(near.model.embed_tokens.weight, model.model.embed_tokens.weight)
    batch = eval_ds[:8]
    ids, labels = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])

    def kl_and_loss(student):
        with torch.no_grad():
            t = model.eval()(input_ids=ids).logits
            out = student.eval()(input_ids=ids, labels=labels)
        kl = F.kl_div(F.log_softmax(out.logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        return kl.item() / ids.shape[1], out.loss.item()

    (kl_near, loss_near), (kl_far, loss_far) = kl_and_loss(near), kl_and_loss(far)
    print(f"llama student init: KL to teacher {kl_near:.3f} (teacher layers) vs {kl_far:.3f} (scratch)")
    assert kl_near < 0.5 * kl_far and loss_near < loss_far, (kl_near, kl_far, loss_near, loss_far)


@pytest.mark.slow
def test_distill_llama_to_llama_two_processes(llama_teacher, tmp_path):
    """configs/recipes/distill_tiny_llama.yaml on 2 processes (ZeRO-2): the Llama student from teacher layers learns
    (its loss falls), ends below the same student trained from scratch, and summary.json reports its eval loss
    next to the teacher's; final/ is a 2-layer Llama with the teacher's GQA layout."""
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "llama")
    flags = list(SHORT)
    for key, value in (("--config", LLAMA_DISTILL), ("--max_steps", "10"), ("--logging_steps", "1")):
        flags[flags.index(key) + 1] = value
    run(
        launch_cmd(
            "recipes/distill.py",
            flags + ["--teacher_name_or_path", llama_teacher[0], "--output_dir", out],
            deepspeed="configs/deepspeed/zero2.json",
        ),
        timeout=600,
    )
    s = summary(out)
    assert s["world_size"] == 2 and s["layer_map"] == [0, 2] and s["student_layers"] == 2
    logged = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("phase") == "distill" and "kd" in r]
    assert len(logged) == 10 and logged[-1]["loss"] < logged[0]["loss"], [r["loss"] for r in logged]
    assert logged[-1]["kd"] < logged[0]["kd"]  # closer to the teacher's distribution
    teacher, student, scratch = (s[w]["eval_loss"] for w in ("teacher", "student", "scratch"))
    print(f"llama distill eval loss: teacher {teacher:.3f}, student {student:.3f}, scratch {scratch:.3f}")
    assert math.isfinite(teacher) and student < scratch, (teacher, student, scratch)
    assert s["quality_vs_teacher"] == pytest.approx(s["teacher"]["eval_ppl"] / s["student"]["eval_ppl"])
    final = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert final.config.model_type == "llama" and final.config.num_hidden_layers == 2
    assert final.config.num_key_value_heads == 2 and final.config.tie_word_embeddings


def test_qwen2_student_keeps_per_layer_attention_types_of_its_blocks(tmp_path):
    """Qwen2's config lists an attention type per layer: the 2-layer student's list has the 2 copied blocks' entries
    (a 4-entry list on a 2-layer config would not be the model it describes), and it saves and loads."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.distill.distillation import student_from_teacher
    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    torch.manual_seed(0)
    config = load_model_config("configs/models/tiny_qwen2.json", byte_tokenizer())
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    teacher = AutoModelForCausalLM.from_config(config)
    student, mapping = student_from_teacher(teacher, 2, "teacher_layers")
    assert mapping == [0, 2] and student.config.layer_types == ["full_attention", "full_attention"]
    assert torch.equal(student.model.layers[1].self_attn.q_proj.bias, teacher.model.layers[2].self_attn.q_proj.bias)
    student.save_pretrained(str(tmp_path / "s"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"))
    assert again.config.num_hidden_layers == 2 and again.config.layer_types == ["full_attention", "full_attention"]
