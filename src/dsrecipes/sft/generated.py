"""A deterministic generated chat set in the language of dsrecipes.train.corpus.generated_corpus, with a rule to learn.

The rule: the user says one word of the language, the assistant answers with the word that most often follows it
in the corpus (its first successor, weight 0.6). A model pretrained on the corpus has seen those bigrams but not the
chat format; SFT has to teach it to answer. Each conversation has 1-2 such turns and, half the time, a system prompt.

    train, heldout = generated_chat_split(n_train=2000, n_heldout=100, language_seed=1234, sample_seed=7)

Train and held-out are split by conversation: the held-out ones are drawn after the train ones from the same stream,
and any that repeats a train conversation exactly is left out.
"""

from __future__ import annotations

import random

from dsrecipes.train.corpus import Language

SYSTEM_PROMPT = "Say the next word."


def generated_language(language_seed: int) -> tuple[list[str], dict[str, list[int]]]:
    """(words, successors) of the corpus language (dsrecipes.train.corpus.Language): each word's 3 successor
    indices, weights 0.6, 0.3, 0.1."""
    lang = Language(language_seed)
    return lang.words, lang.successors


def most_likely_successor(language_seed: int) -> dict[str, str]:
    words, succ = generated_language(language_seed)
    return {w: words[succ[w][0]] for w in words}


def generated_chat(num: int, language_seed: int, sample_seed: int, num_words: int = 160) -> list[dict]:
    """`num` conversations {"messages": [...]}: optional system prompt, then 1-2 (user word, assistant successor).
    The user's words are drawn from the language's first `num_words` words (fewer: a smaller table to learn)."""
    answer = most_likely_successor(language_seed)
    words = list(answer)[:num_words]
    rng = random.Random(sample_seed)
    out = []
    for _ in range(num):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
        for _turn in range(rng.randint(1, 2)):
            w = words[rng.randrange(len(words))]
            messages += [{"role": "user", "content": w}, {"role": "assistant", "content": answer[w]}]
        out.append({"messages": messages})
    return out


def generated_chat_split(n_train: int, n_heldout: int, language_seed: int, sample_seed: int, num_words: int = 160):
    """-> (train, heldout): n_train conversations, then up to n_heldout more that repeat no train conversation."""
    convs = generated_chat(n_train + 4 * n_heldout, language_seed, sample_seed, num_words)
    train = convs[:n_train]
    seen = {_key(c) for c in train}
    heldout = [c for c in convs[n_train:] if _key(c) not in seen][:n_heldout]
    return train, heldout


def _key(conv: dict) -> tuple:
    return tuple((m["role"], m["content"]) for m in conv["messages"])
