"""The generated corpus's entropy rate (dsrecipes.train.corpus) is the loss of its Bayes-optimal model.

Checked without the formula: a byte-by-byte predictor that knows the language (words, successor weights, the
length distribution, the '.' rule) scores sampled documents; its mean loss per byte is the entropy rate. The same
predictor checks Language.block_loss (the optimum on documents cut into blocks, what an eval loss can reach).

Run: .venv/bin/python -m pytest tests/test_corpus.py -q
"""

from __future__ import annotations

import math

from dsrecipes.train.corpus import (
    MAX_TRANSITIONS,
    MIN_TRANSITIONS,
    PERIOD_EVERY,
    WEIGHTS,
    Language,
    generated_corpus,
    generated_split,
)

EOS = "\0"  # stands for the EOS token after each document


def _next_byte_probs(lang, prev, typed, done, period_due, after_word):
    """P(next byte) given the previous word (None at the start), the letters typed of the current word, the
    transitions done so far, and whether the current word ended (after_word: its '.' written if due)."""
    if after_word:  # the word (and its '.') is complete: end the document, or a space
        left = MAX_TRANSITIONS - done + 1
        p_end = 1.0 / left if done >= MIN_TRANSITIONS else 0.0
        return {EOS: p_end, " ": 1.0 - p_end}
    if prev is None:
        cands = [(w, 1.0 / len(lang.words)) for w in lang.words]
    else:
        cands = [(lang.words[j], p) for j, p in zip(lang.successors[prev], WEIGHTS)]
    cands = [(w, p) for w, p in cands if w.startswith(typed)]
    total = sum(p for _, p in cands)
    probs: dict[str, float] = {}
    for w, p in cands:
        nxt = w[len(typed)] if len(w) > len(typed) else ("." if period_due else "<end>")
        probs[nxt] = probs.get(nxt, 0.0) + p / total
    return probs


def _optimal_loss(lang, doc: str) -> tuple[float, int]:
    """Total nats the Bayes-optimal byte predictor pays on `doc` + EOS, and the bytes it predicted."""
    nats, prev, done = 0.0, None, -1  # done = transitions completed; the first word is not a transition
    tokens = doc.split(" ")
    for t, token in enumerate(tokens):
        word, period = token.rstrip("."), token.endswith(".")
        due = done >= 0 and done % PERIOD_EVERY == PERIOD_EVERY - 1
        for k in range(len(word) + 1):
            probs = _next_byte_probs(lang, prev, word[:k], done, due, after_word=False)
            if k < len(word):
                nats -= math.log(probs[word[k]])
            else:  # the word ends here (longer words with this prefix would go on): its '.', or the boundary next
                nats -= math.log(probs["." if due else "<end>"])
        assert period == due
        done, prev = done + 1, word
        probs = _next_byte_probs(lang, prev, "", done, False, after_word=True)
        nats -= math.log(probs[EOS] if t == len(tokens) - 1 else probs[" "])
    return nats, len(doc) + 1


def test_the_entropy_rate_is_the_loss_of_the_bayes_optimal_predictor():
    lang, docs = Language(1234), generated_corpus(1500, 1234, 4321)
    scored = [_optimal_loss(lang, d) for d in docs]
    per_doc = sum(n for n, _ in scored) / len(docs)
    per_byte = sum(n for n, _ in scored) / sum(b for _, b in scored)
    assert abs(per_doc - lang.document_entropy()) / lang.document_entropy() < 0.02, (per_doc, lang.document_entropy())
    assert abs(per_byte - lang.entropy_rate_per_byte()) / lang.entropy_rate_per_byte() < 0.02
    assert 0.15 < lang.entropy_rate_per_byte() < 0.25  # nats per byte: far below the ~2.8 of the unigram entropy


def test_mean_document_bytes_matches_sampled_documents():
    lang = Language(1234)
    docs = generated_corpus(6000, 1234, 99)
    sampled = sum(len(d) + 1 for d in docs) / len(docs)
    assert abs(sampled - lang.mean_document_bytes()) < 2.0, (sampled, lang.mean_document_bytes())  # SE ~0.7 bytes


def test_the_summary_figure_is_per_token_of_the_tokenizer_in_use():
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.train.data import build_lm_datasets, byte_tokenizer

    args, _ = parse_args(RECIPES["train_lm"], ["--generated_docs", "100", "--eval_docs", "20"])
    _, _, info = build_lm_datasets(args, byte_tokenizer())
    assert info["entropy_rate"] == Language(args.generated_seed).entropy_rate_per_byte()  # one byte per token
    assert info["entropy_rate"] < info["unigram_entropy"] / 5


def test_block_loss_is_the_optimal_predictors_loss_on_one_long_block():
    """One block holding every document: the filter of Language.block_loss pays what the independent predictor above
    pays, except for not knowing where the block starts (bounded by the first document's start-up cost), while a
    wrong successor weight, length hazard or '.' rule would add a bias on each of its ~13,700 tokens (measured: the
    two totals are 1.8 nats apart)."""
    lang, docs = Language(1234), generated_corpus(60, 1234, 99)
    optimal = sum(_optimal_loss(lang, d)[0] for d in docs)
    tokens = sum(len(d) + 1 for d in docs)
    filtered = lang.block_loss(docs, tokens) * (tokens - 1)  # the first token of a block is not predicted
    assert abs(filtered - optimal) < 15.0, (filtered, optimal, tokens)


def test_block_loss_falls_toward_the_entropy_rate_as_blocks_grow():
    """Short blocks start inside documents without the words, transitions and '.' phase before them: the optimum on
    the eval blocks of `make train` (128 tokens) is well above the entropy rate; long blocks approach it."""
    lang, docs = Language(1234), generated_split(0, 100, 1234)[1]  # the first 100 of make train's eval documents
    rate = lang.entropy_rate_per_byte()
    losses = {size: lang.block_loss(docs, size) for size in (128, 512, 4096)}
    assert losses[128] > losses[512] > losses[4096] > 0.98 * rate
    assert losses[128] > 1.15 * rate and losses[4096] < 1.03 * rate, (losses, rate)
