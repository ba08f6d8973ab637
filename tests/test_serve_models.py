"""Serving: what the server loads. int8 outputs agree with fp32; a ZeRO checkpoint serves the same model as the
exported final/; DeepSpeed init_inference with 2 tensor-parallel CPU processes gives TP=1's greedy tokens.

Run: .venv/bin/python -m pytest tests/test_serve_models.py -q     (the ZeRO and TP tests are marked slow)
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import launch_cmd, run
from serving_helpers import Server, build_bert, build_gpt2, build_llama

PROMPTS = ["ba", "kolem dasi", "z", "fupatu ramo kise vo"]


def serve_args(*argv):
    from dsrecipes.config.args import RECIPES, parse_args

    return parse_args(RECIPES["serve"], list(argv))[0]


def greedy(model, tok, prompts, n=16, max_batch=8):
    from dsrecipes.serve.engine import Engine, GenParams

    seqs = Engine(model, tok, max_batch).generate([tok.encode(p) for p in prompts], GenParams(n, temperature=0))
    return [s.prompt_ids + s.out_ids for s in seqs]


TEXTS = ["hello world", "kolem dasi fupatu", "a b c d e f g"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    from types import SimpleNamespace

    from dsrecipes.serve.loading import embed, load_encoder, load_lm

    root = tmp_path_factory.mktemp("int8")
    lm_dir, bert_dir = build_gpt2(str(root / "gpt2"), n_embd=128), build_bert(str(root / "bert"), hidden=128)
    ref, tok = load_lm(serve_args("--model_name_or_path", lm_dir))
    enc, etok = load_encoder(serve_args("--embedding_model_name_or_path", bert_dir))
    return SimpleNamespace(
        lm_dir=lm_dir,
        bert_dir=bert_dir,
        ref=ref,
        seqs=greedy(ref, tok, PROMPTS, n=24),
        etok=etok,
        vecs=embed(enc, etok, TEXTS)[0],
    )


@pytest.mark.parametrize("method", ["torch_int8_dynamic", "torchao_int8_weight_only", "torchao_int8_dynamic"])
def test_int8_agrees_with_fp32(fp32, method):
    from dsrecipes.serve.loading import cosine, embed, load_encoder, load_lm, top1_agreement

    q, _ = load_lm(serve_args("--model_name_or_path", fp32.lm_dir, "--quantization", method))
    n_int8 = sum(
        1
        for m in q.modules()
        if type(m).__module__.startswith("torch.ao.nn.quantized")
        or type(getattr(m, "weight", None)).__name__ == "Int8Tensor"
    )
    assert n_int8 >= 8, f"{method} quantized only {n_int8} layers"  # 2 blocks x 4 projections (Conv1D converted)
    agree = top1_agreement(fp32.ref, q, fp32.seqs)
    assert agree >= 0.9, f"{method}: greedy top-1 agreement {agree:.3f}"
    qenc, _ = load_encoder(serve_args("--embedding_model_name_or_path", fp32.bert_dir, "--quantization", method))
    cos = cosine(fp32.vecs, embed(qenc, fp32.etok, TEXTS)[0]).min().item()
    assert cos >= 0.99, f"{method}: embedding cosine {cos:.4f}"


@pytest.mark.slow
def test_zero_checkpoint_serves_the_same_model_as_final(tmp_path):
    from dsrecipes.serve.loading import load_lm

    out = tmp_path / "run"
    run(
        launch_cmd(
            "recipes/train_lm.py",
            [
                "--config",
                "configs/recipes/train_tiny_zero2.yaml",
                "--max_steps",
                "2",
                "--save_steps",
                "2",
                "--eval_steps",
                "2",
                "--logging_steps",
                "1",
                "--report_to",
                "none",
                "--generated_docs",
                "60",
                "--eval_docs",
                "20",
                "--per_device_train_batch_size",
                "4",
                "--output_dir",
                str(out),
            ],
        )
    )
    step_dir = out / "checkpoints" / "step_00000002"
    assert (step_dir / "pytorch_model").is_dir() and (out / "final" / "config.json").is_file()
    final, tok = load_lm(serve_args("--model_name_or_path", str(out / "final")))
    ids = torch.tensor([tok.encode("kolem dasi fupatu")])
    want = final(input_ids=ids).logits
    for path in (step_dir, out / "checkpoints"):  # a step dir, or checkpoints/ through its `latest` pointer
        model, _ = load_lm(serve_args("--model_name_or_path", str(path)))
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5), path
    with_cfg, _ = load_lm(
        serve_args("--model_name_or_path", str(step_dir), "--model_config", "configs/models/tiny_gpt2.json")
    )
    assert torch.allclose(with_cfg(input_ids=ids).logits, want, atol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp_1(tmp_path):
    from dsrecipes.serve.loading import load_lm

    llama = build_llama(str(tmp_path / "llama"))
    tp1, tok = load_lm(serve_args("--model_name_or_path", llama, "--engine", "deepspeed"))
    want = [tok.decode(s[len(tok.encode(p)) :]) for p, s in zip(PROMPTS, greedy(tp1, tok, PROMPTS, n=20))]
    torchrun = [
        os.path.join(os.path.dirname(__import__("sys").executable), "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(__import__("conftest").free_port()),
    ]
    srv = Server(
        ["--config", "configs/recipes/serve_tp2_cpu.yaml", "--model_name_or_path", llama],
        str(tmp_path / "tp2.log"),
        launcher=torchrun,
    )
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: the TP batch holds several rows
            got = list(pool.map(lambda p: srv.complete(p, max_tokens=20)["choices"][0]["text"], PROMPTS))
        assert "tp 2" in srv.tail()
    finally:
        srv.stop(signal.SIGTERM)  # torchrun forwards it; rank 0 drains and tells rank 1 to stop
    assert got == want
    log = srv.tail(20000)
    assert "server stopped" in log and "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log
