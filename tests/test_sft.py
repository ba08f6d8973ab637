"""Chat fine-tuning (SFT): assistant-only labels token by token, packing equal to unpacked, the generated chat set, bad
input as one line, and two 2-process ZeRO-2 launches of recipes/sft.py (packed and padded) whose held-out exact match
rises above the starting model's.

Run: .venv/bin/python -m pytest tests/test_sft.py -q            (unit tests: ~30 s; the two launches: ~2-3 min)
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, launch_cmd, run
from dsrecipes.config.errors import ConfigError
from dsrecipes.sft import chat_data, exact_match, generated, packing
from dsrecipes.train.data import EOS, byte_tokenizer, generated_corpus

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second"},
    {"role": "assistant", "content": "héllo ✓ two"},  # multi-byte UTF-8: several byte tokens per character
    {"role": "user", "content": "third"},
    {"role": "assistant", "content": "last one"},
]
ASSISTANT = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def labelled_spans(ids, labels) -> list[list[int]]:
    """Maximal runs of labelled positions, as lists of token ids."""
    spans, cur = [], []
    for tid, lab in zip(ids, labels):
        if lab != -100:
            assert lab == tid  # a label is the token itself (the model shifts)
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def check_labels(tok, messages, answers):
    ids, labels = chat_data.tokenize_chat(tok, messages)
    assert len(ids) == len(labels)
    spans = labelled_spans(ids, labels)
    assert [tok.decode(s) for s in spans] == [a + tok.eos_token for a in answers]
    assert [s[-1] for s in spans] == [tok.eos_token_id] * len(answers)  # each turn's EOS is labelled
    want = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert sum(lab != -100 for lab in labels) == want  # nothing else: no role markers, prompts, user or system text
    unlabelled = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in unlabelled
    return ids, labels


def test_labels_cover_assistant_turns_only_default_template():
    tok = byte_tokenizer()
    ids, _ = check_labels(tok, CONVERSATION, ASSISTANT)
    assert tok.decode(ids).count("<|assistant|>\n") == 3


def test_labels_with_the_tokenizers_own_template():
    tok = byte_tokenizer()
    tok.chat_template = (  # an HF tokenizer with its own template: chat_template(tok) must pick it
        "{{ bos_token }}{% for m in messages %}### {{ m['role'] | upper }}:\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### ASSISTANT:\n{% endif %}"
    )
    ids, _ = check_labels(tok, CONVERSATION, ASSISTANT)
    assert tok.decode(ids).startswith(EOS + "### SYSTEM:")  # the own template, not the default's <|system|>


def test_generated_language_is_the_corpus_language():
    words, succ = generated.generated_language(1234)
    docs = generated_corpus(200, 1234, 99)
    follows: dict[str, Counter] = {}
    for doc in docs:
        toks = [w.rstrip(".") for w in doc.split()]
        for a, b in zip(toks, toks[1:]):
            assert b in {words[i] for i in succ[a]}  # every bigram of the corpus is one of the 3 successors
            follows.setdefault(a, Counter())[b] += 1
    best = generated.most_likely_successor(1234)
    frequent = [w for w, c in follows.items() if sum(c.values()) >= 40]
    agree = sum(follows[w].most_common(1)[0][0] == best[w] for w in frequent)
    assert len(frequent) > 20 and agree >= 0.9 * len(frequent)


def test_generated_chat_split_is_deterministic_disjoint_and_follows_the_rule():
    train, held = generated.generated_chat_split(500, 50, 1234, 7)
    assert (train, held) == generated.generated_chat_split(500, 50, 1234, 7)
    assert len(train) == 500 and len(held) == 50
    keys = {generated._key(c) for c in train}
    assert not any(generated._key(c) in keys for c in held)
    best = generated.most_likely_successor(1234)
    for conv in train + held:
        msgs = [m for m in conv["messages"] if m["role"] != "system"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert all(best[u["content"]] == a["content"] for u, a in zip(msgs[::2], msgs[1::2]))
    few = generated.generated_chat(100, 1234, 7, num_words=5)
    assert len({m["content"] for c in few for m in c["messages"] if m["role"] == "user"}) <= 5


@pytest.mark.parametrize(
    "line, key, problem",
    [
        ('{"conversation": []}', "messages", "missing"),
        ('{"messages": []}', "messages", "empty conversation"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role", "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant turn"),
        ('{"messages": [{"role": "user"}]}', "messages[0]", "needs a role and a string content"),
        ('{"messages": [', "-", "not JSON"),
    ],
)
def test_bad_chat_lines_are_one_line_errors_with_file_and_line(tmp_path, line, key, problem):
    good = json.dumps({"messages": CONVERSATION})
    path = tmp_path / "chat.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ConfigError) as err:
        chat_data.load_chat_jsonl(str(path))
    msg = err.value.line()
    assert msg.startswith(f"error: {path}:3: {key}: {problem}") and "; " in msg and "\n" not in msg


def test_shipped_example_jsonl_loads_and_labels_its_answers():
    tok = byte_tokenizer()
    convs = chat_data.load_chat_jsonl(os.path.join(ROOT, "data/chat_example.jsonl"))
    assert len(convs) >= 10 and convs[0]["where"].endswith("chat_example.jsonl:1")
    for conv in convs:
        answers = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        check_labels(tok, conv["messages"], answers)


def test_recipe_prints_one_line_for_a_bad_chat_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    robot = {"messages": [{"role": "robot", "content": "x"}]}
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(robot) + "\n")
    flags = ["--config", "configs/recipes/sft_tiny.yaml", "--model_name_or_path", "", "--dataset", str(bad)]
    proc = run([sys.executable, "recipes/sft.py", *flags, "--output_dir", str(tmp_path / "out")], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        f"error: {bad}:2: messages[0].role: unknown role 'robot'; use one of ('system', 'user', 'assistant')"
    ]
    assert "Traceback" not in proc.stderr


def test_conversations_over_block_size_are_dropped_and_counted(tmp_path):
    tok = byte_tokenizer()
    short = {"messages": CONVERSATION[1:3], "where": "f.jsonl:1"}
    long = {"messages": CONVERSATION, "where": "f.jsonl:2"}
    n_short = len(chat_data.tokenize_chat(tok, short["messages"])[0])
    examples, info = chat_data.tokenize_conversations([short, long, short], tok, block_size=n_short)
    assert len(examples) == 2 and info["dropped_too_long"] == 1 and info["first_dropped"].startswith("f.jsonl:2 (")
    _, info = chat_data.tokenize_conversations([long], tok, block_size=n_short)
    assert "raise block_size" in chat_data.too_long_error("r.yaml", info, n_short).line()


def _examples(n=12, seed=3):
    tok = byte_tokenizer()
    convs = generated.generated_chat(n, 1234, seed)
    return tok, chat_data.tokenize_conversations(convs, tok, block_size=128)[0]


def test_packed_layout_is_transformers_flattening_layout():
    from transformers import DataCollatorWithFlattening

    tok, examples = _examples(4)
    mine = packing.collate_packed([examples], tok.pad_token_id)
    theirs = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    )
    for key in ("input_ids", "labels", "position_ids"):
        assert mine[key].tolist() == theirs[key].tolist(), key
    assert int(mine["real_tokens"][0]) == sum(len(e["input_ids"]) for e in examples)


def _model(config: str, impl: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.load(open(os.path.join(ROOT, config)))
    spec = {k: v for k, v in spec.items() if k != "_comment"}
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, vocab_size=vocab)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("config", ["configs/models/tiny_llama.json", "configs/models/tiny_gpt2.json"])
def test_per_conversation_loss_is_the_same_packed_and_unpacked(config, impl):
    tok, examples = _examples(12)
    model = _model(config, impl, len(tok))
    rows = packing.pack(examples, block_size=128)
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 2  # really packed
    batch = packing.collate_packed(rows, tok.pad_token_id)
    index = {id(ex): i for i, ex in enumerate(examples)}  # a conversation's number: its place in `examples`
    seg = torch.full_like(batch["input_ids"], -1)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex["input_ids"])
            seg[r, start : start + n], start = index[id(ex)], start + n
    alone = {}
    for i, ex in enumerate(examples):
        one = packing.collate_padded([ex], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=one["input_ids"], use_cache=False).logits
        alone[i] = packing.per_conversation_loss(logits, one["labels"], torch.zeros_like(one["input_ids"]))[0]
    k = len(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    packed = packing.per_conversation_loss(logits, batch["labels"], seg)
    assert sorted(packed) == list(range(k))
    for i in range(k):
        assert packed[i] == pytest.approx(alone[i], rel=1e-4, abs=1e-4), i
    # the padded layout (attention_mask, one conversation a row) gives the same losses
    padded = packing.collate_padded(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    rows_seg = torch.arange(k).unsqueeze(1).expand_as(padded["input_ids"])
    by_row = packing.per_conversation_loss(logits, padded["labels"], rows_seg)
    assert all(by_row[i] == pytest.approx(alone[i], rel=1e-4, abs=1e-4) for i in range(k))
    assert packing.check_packing(model, "r.yaml") < 1e-4


def test_packing_is_refused_for_a_model_that_attends_across_conversations():
    from transformers import AutoModelForCausalLM, OPTConfig

    # OPT derives its positions from attention_mask, not from position_ids: packed rows leak across conversations
    cfg = OPTConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError) as err:
        packing.check_packing(model, "r.yaml")
    line = err.value.line()
    assert line.startswith("error: r.yaml: packing: OPTForCausalLM") and "set packing: false" in line


def test_greedy_matches_generate_and_exact_match_counts():
    tok, _ = _examples(1)
    model = _model("configs/models/tiny_llama.json", "sdpa", len(tok))
    prompts = [tok("<|user|>\nba", add_special_tokens=False)["input_ids"], [5, 6, 7, 8, 9, 10]]
    mine = exact_match.greedy(model, prompts, tok.pad_token_id, 6, "cpu")
    for p, out in zip(prompts, mine):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out == ref[0, len(p) :].tolist()  # left padding changes nothing
    convs = generated.generated_chat(5, 1234, 7)
    res = exact_match.exact_match(model, tok, convs)
    assert (
        res["turns"]
        == len(exact_match.questions(convs))
        == sum(m["role"] == "assistant" for c in convs for m in c["messages"])
    )
    assert res["correct"] == 0 and res["exact_match"] == 0.0  # an untrained model answers nothing right


# ----------------------------------------------------------------------------- the recipe, launched
SFT_RUN = {  # from scratch (model_config), on a 20-word table: 0% -> ~45% exact match in 200 steps (~1 min of training)
    "model_config": "configs/models/tiny_gpt2.json",
    "generated_chat_words": 20,
    "generated_conversations": 600,
    "generated_eval_conversations": 40,
    "per_device_train_batch_size": 4,
    "max_steps": 150,
    "learning_rate": 0.003,
    "warmup_steps": 5,
    "logging_steps": 10,
    "eval_steps": 150,
    "save_steps": 0,
    "report_to": "none",
}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    out = {}
    for mode in ("packed", "padded"):
        d = tmp_path_factory.mktemp(f"sft_{mode}")
        flags = ["--config", "configs/recipes/sft_tiny.yaml", "--model_name_or_path", "", "--output_dir", str(d)]
        # padded: 8 conversations a micro-batch, about what 4 packed rows of 128 tokens hold
        mode_flags = {"packing": mode == "packed", "export_final": mode == "packed"}
        if mode == "padded":
            mode_flags["per_device_train_batch_size"] = 8
        for k, v in {**SFT_RUN, **mode_flags}.items():
            flags += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
        proc = run(launch_cmd("recipes/sft.py", flags, deepspeed="configs/deepspeed/zero2.json"), timeout=600)
        out[mode] = (json.load(open(d / "summary.json")), proc.stdout, d)
    return out


@pytest.mark.slow
def test_sft_packed_zero2_learns_the_rule(sft_runs):
    s, stdout, d = sft_runs["packed"]
    assert s["recipe"] == "sft" and s["status"] == "completed" and s["steps"] == 150 and s["packing"] is True
    assert s["exact_match_before"] == 0.0 and s["exact_match_after"] > s["exact_match_before"] + 0.1
    assert s["exact_match"]["after"]["turns"] == s["exact_match"]["before"]["turns"] > 40
    assert s["final_loss"] < s["first_loss"] and s["packing_leak"] < 1e-4
    assert f"{s['exact_match_after']:.1%} of {s['exact_match']['after']['turns']} held-out answers" in stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "final")
    assert "<|assistant|>" in tok.chat_template  # the exported tokenizer carries the template the model learnt
    AutoModelForCausalLM.from_pretrained(d / "final")


@pytest.mark.slow
def test_sft_padded_has_more_padding_and_learns_too(sft_runs):
    packed, _, _ = sft_runs["packed"]
    padded, _, _ = sft_runs["padded"]
    assert padded["packing"] is False and padded["exact_match_after"] > padded["exact_match_before"]
    assert padded["padding_tokens"] > packed["padding_tokens"]
    assert padded["padding_fraction"] > packed["padding_fraction"]
    for s in (packed, padded):
        assert s["real_tokens"] > 0 and s["real_tokens_per_s"] > 0 and s["dropped_too_long"] == 0


@pytest.mark.parametrize("packed", [True, False])
def test_the_prefix_cache_finds_sft_rows_again_and_changes_no_loss_or_gradient(packed):
    """freeze_cache with SFT data: the recipe collates to a fixed width (block_size) when the cache is on, so a row
    comes back in the next epoch with the same padding and is a hit; with the cache the masked loss and the trainable
    gradients are those without it. Rows padded to each batch's longest would change between epochs (no hits)."""
    import types

    from dsrecipes.freezing.freezer import embedding_modules
    from dsrecipes.freezing.prefix_cache import PrefixCache
    from dsrecipes.sft.data import collate_width
    from dsrecipes.train.models import transformer_blocks

    tok, examples = _examples(12)
    assert collate_width(types.SimpleNamespace(block_size=128, freeze_cache="memory")) == 128
    assert collate_width(types.SimpleNamespace(block_size=128, freeze_cache="none")) is None
    items = packing.pack(examples, block_size=128) if packed else examples
    items = items[: len(items) // 2 * 2]  # whole batches of 2 in both epochs
    collate = packing.collate_packed if packed else packing.collate_padded
    model = _model("configs/models/tiny_gpt2_nodropout.json", "sdpa", len(tok)).train()
    for m in embedding_modules(model) + list(transformer_blocks(model)[:2]):
        m.requires_grad_(False)

    def epoch(order, width):
        out = []
        for i in range(0, len(order), 2):  # batches of 2, in this epoch's order
            batch = collate([items[j] for j in order[i : i + 2]], tok.pad_token_id, width=width)
            batch.pop("real_tokens")
            model.zero_grad()
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        return out

    n = len(items)
    orders = [list(range(n)), [(i + 1) % n for i in range(n)]]  # two epochs; the second pairs other rows
    ref = [epoch(o, 128) for o in orders]
    cache = PrefixCache(model, "memory")
    cache.activate(2)
    got = [epoch(o, 128) for o in orders]
    assert cache.hits == n and cache.misses == n  # epoch 1 stores every row, epoch 2 finds every row
    for (la, ga), (lb, gb) in zip(sum(ref, []), sum(got, [])):
        assert la == pytest.approx(lb, abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ga, gb))
    cache.close()
    longest = PrefixCache(model, "memory")  # the batch's longest: the second epoch's rows differ, few come back
    longest.activate(2)
    for o in orders:
        epoch(o, None)
    assert longest.hits < cache.hits
    longest.close()
