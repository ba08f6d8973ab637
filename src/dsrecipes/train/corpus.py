"""The generated corpus: a small synthetic language, its documents, and the loss of its Bayes-optimal model.

    lang = Language(1234)                         # 160 made-up words, 3 weighted successors each
    docs = generated_corpus(2000, 1234, 1235)     # the language of seed 1234, documents of sample seed 1235
    nats = lang.document_entropy()                # exact entropy of one document, in nats
    rate = lang.entropy_rate_per_byte()           # ... per byte token (the byte tokenizer), EOS included

Why the optimum is known: a document is a first word (uniform over the words), a number of transitions n (uniform
in 20..60), and n successor picks (weights 0.6/0.3/0.1 among 3 distinct words). The text determines all three
(words are distinct spellings, '.' after every 9th transition is fixed by position, the end is EOS), so the text's
entropy is exactly ln(160) + ln(41) + E[n] * H(0.6, 0.3, 0.1). Divided by the expected tokens per document it is
the entropy rate: the eval loss of a model that knows the language. (Cutting the token stream into blocks costs
the first tokens of each block some context, so a finite block size sits slightly above it.)
"""

from __future__ import annotations

import math
import random

N_WORDS = 160
SUCCESSORS = 3
WEIGHTS = (0.6, 0.3, 0.1)
MIN_TRANSITIONS, MAX_TRANSITIONS = 20, 60
PERIOD_EVERY = 9  # a '.' after every 9th transition


class Language:
    """The words and successor table of one language seed (the same seed always gives the same language)."""

    def __init__(self, language_seed: int):
        lang = random.Random(language_seed)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        words: list[str] = []
        while len(words) < N_WORDS:
            w = "".join(lang.choice(syllables) for _ in range(lang.randint(1, 3)))
            if w not in words:
                words.append(w)
        self.words = words
        self.successors = {w: lang.sample(range(len(words)), SUCCESSORS) for w in words}

    def document(self, rng: random.Random) -> str:
        w = self.words[rng.randrange(len(self.words))]
        out = [w]
        for i in range(rng.randint(MIN_TRANSITIONS, MAX_TRANSITIONS)):
            w = self.words[rng.choices(self.successors[w], WEIGHTS)[0]]
            out.append(w + ("." if i % PERIOD_EVERY == PERIOD_EVERY - 1 else ""))
        return " ".join(out)

    # ------------------------------------------------------------------ the optimum
    def document_entropy(self) -> float:
        """Exact entropy (nats) of one document's text."""
        lengths = MAX_TRANSITIONS - MIN_TRANSITIONS + 1
        mean_n = (MIN_TRANSITIONS + MAX_TRANSITIONS) / 2
        pick = -sum(p * math.log(p) for p in WEIGHTS)
        return math.log(len(self.words)) + math.log(lengths) + mean_n * pick

    def mean_document_bytes(self) -> float:
        """Expected bytes of one document (words, spaces, periods) plus its EOS token, from the word distribution at
        each position of the chain (uniform first word, then the successor weights)."""
        size = [len(w) for w in self.words]
        dist = [1.0 / len(self.words)] * len(self.words)
        letters_upto = []  # letters_upto[k]: expected letters of words 0..k
        total = 0.0
        for _ in range(MAX_TRANSITIONS + 1):
            total += sum(p * s for p, s in zip(dist, size))
            letters_upto.append(total)
            nxt = [0.0] * len(dist)
            for w, p in zip(self.words, dist):
                for j, weight in zip(self.successors[w], WEIGHTS):
                    nxt[j] += p * weight
            dist = nxt
        ns = range(MIN_TRANSITIONS, MAX_TRANSITIONS + 1)
        per_n = [letters_upto[n] + n + n // PERIOD_EVERY + 1 for n in ns]  # + spaces + periods + EOS
        return sum(per_n) / len(per_n)

    def entropy_rate_per_byte(self) -> float:
        """Nats per byte token: the eval loss of the Bayes-optimal model under the byte tokenizer."""
        return self.document_entropy() / self.mean_document_bytes()


def generated_corpus(num_docs: int, language_seed: int, sample_seed: int) -> list[str]:
    """Documents in the language of `language_seed`; `sample_seed` picks the documents, so train and eval share a
    language but not text. Unigram byte entropy is about 3 nats; the entropy rate (Language.entropy_rate_per_byte)
    is far lower, and a model that learns spellings and successors approaches it."""
    lang, rng = Language(language_seed), random.Random(sample_seed)
    return [lang.document(rng) for _ in range(num_docs)]
