"""The generated corpus: a small synthetic language, its documents, and the loss of its Bayes-optimal model.

    lang = Language(1234)                         # 160 made-up words, 3 weighted successors each
    docs = generated_corpus(2000, 1234, 1235)     # the language of seed 1234, documents of sample seed 1235
    nats = lang.document_entropy()                # exact entropy of one document, in nats
    rate = lang.entropy_rate_per_byte()           # ... per byte token (the byte tokenizer), EOS included
    floor = lang.block_loss(docs, 128)            # the optimum on those documents cut into 128-token blocks

Why the optimum is known: a document is a first word (uniform over the words), a number of transitions n (uniform
in 20..60), and n successor picks (weights 0.6/0.3/0.1 among 3 distinct words). The text determines all three
(words are distinct spellings, '.' after every 9th transition is fixed by position, the end is EOS), so the text's
entropy is exactly ln(160) + ln(41) + E[n] * H(0.6, 0.3, 0.1). Divided by the expected tokens per document it is
the entropy rate: the eval loss of a model that knows the language and sees each document from its start.

Cut into blocks, the eval text costs more: a block that starts inside a document does not show the words, the
transitions or the '.' phase before it. Language.block_loss(texts, block_size) is the Bayes-optimal loss on exactly
those blocks (an exact filter): 0.247 nats/byte on make train's 100 eval documents in 128-token blocks, 1.23x the
entropy rate of 0.201; 0.213 at 512 tokens, 0.203 at 4096.
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
        letters_upto = []  # letters_upto[k]: expected letters of words 0..k
        total = 0.0
        for dist in self._word_marginals():
            total += sum(p * s for p, s in zip(dist, size))
            letters_upto.append(total)
        ns = range(MIN_TRANSITIONS, MAX_TRANSITIONS + 1)
        per_n = [letters_upto[n] + n + n // PERIOD_EVERY + 1 for n in ns]  # + spaces + periods + EOS
        return sum(per_n) / len(per_n)

    def _word_marginals(self):
        """P(word) at word positions 0..MAX_TRANSITIONS of a document: uniform, then through the successor weights."""
        dist = [1.0 / len(self.words)] * len(self.words)
        for _ in range(MAX_TRANSITIONS + 1):
            yield dist
            nxt = [0.0] * len(dist)
            for w, p in zip(self.words, dist):
                for j, weight in zip(self.successors[w], WEIGHTS):
                    nxt[j] += p * weight
            dist = nxt

    def entropy_rate_per_byte(self) -> float:
        """Nats per byte token: the eval loss of the Bayes-optimal model under the byte tokenizer."""
        return self.document_entropy() / self.mean_document_bytes()

    # ------------------------------------------------------------------ the optimum on cut blocks
    def block_loss(self, texts: list[str], block_size: int) -> float:
        """Nats per predicted token that the Bayes-optimal model pays on `texts` joined with EOS and cut into blocks of
        `block_size` byte tokens, as dsrecipes.train.data.tokenize_and_group cuts them (the remainder dropped), each
        block seen on its own: what the eval loss of these blocks can reach. It is above the entropy rate, because a
        block that starts inside a document does not show the words, the transitions or the '.' phase before it.

        Exact filtering: a belief over (unit j of the document, its word, characters of it written), where unit 0 is
        the first word and unit j >= 1 is ' ' + word (+ '.' after every 9th transition); it starts from the
        stationary distribution over token positions, conditioned on the block's first token, and pays
        -log P(next token) for every later one. Byte tokenizer only (one token per character, EOS its own)."""
        stream = [c for text in texts for c in (*text, None)]  # None: the EOS token
        n = (len(stream) // block_size) * block_size
        by_token: dict = {}  # the stationary prior, split by the token each state has just written
        for s, p in self._position_prior().items():
            by_token.setdefault(self._last_token(s), {})[s] = p
        nats, count = 0.0, 0
        for start in range(0, n, block_size):
            block = stream[start : start + block_size]
            belief = _normalise(by_token[block[0]])
            for token in block[1:]:
                nxt = {}
                for state, p in belief.items():
                    for new, q in self._next_states(state):
                        if self._last_token(new) == token:
                            nxt[new] = nxt.get(new, 0.0) + p * q
                mass = sum(nxt.values())
                nats -= math.log(mass)
                count += 1
                belief = {s: p / mass for s, p in nxt.items()}
        return nats / max(count, 1)

    def _unit(self, j: int, w: int) -> str:
        return self.words[w] if j == 0 else " " + self.words[w] + ("." if j % PERIOD_EVERY == 0 else "")

    def _last_token(self, state):
        """The token a state has just written: None (EOS) for the document boundary."""
        j, w, k = state
        return None if w is None else self._unit(j, w)[k - 1]

    def _next_states(self, state):
        """[(next state, probability)]: one token on from `state`."""
        j, w, k = state
        if w is None:  # after EOS: a new document's first word, uniform
            return [((0, v, 1), 1.0 / len(self.words)) for v in range(len(self.words))]
        if k < len(self._unit(j, w)):
            return [((j, w, k + 1), 1.0)]
        end = 1.0 / (MAX_TRANSITIONS - j + 1) if j >= MIN_TRANSITIONS else 0.0  # unit j is transition j
        out = [((0, None, 0), end)] if end else []
        if end < 1.0:  # unit 60 always ends the document
            out += [((j + 1, v, 1), (1.0 - end) * q) for v, q in zip(self.successors[self.words[w]], WEIGHTS)]
        return out

    def _position_prior(self) -> dict:
        """P(state) at a uniformly random token position of the stream: each written character of unit j's word w
        weighs P(the document has unit j) x P(its word is w); the EOS weighs 1 (one per document)."""
        lengths = MAX_TRANSITIONS - MIN_TRANSITIONS + 1
        prior = {(0, None, 0): 1.0}
        for j, dist in enumerate(self._word_marginals()):
            exists = 1.0 if j <= MIN_TRANSITIONS else (MAX_TRANSITIONS - j + 1) / lengths
            for w, p in enumerate(dist):
                for k in range(1, len(self._unit(j, w)) + 1):
                    prior[(j, w, k)] = exists * p
        return prior


def _normalise(belief: dict) -> dict:
    total = sum(belief.values())
    return {s: p / total for s, p in belief.items()}


def generated_split(train_docs: int, eval_docs: int, language_seed: int) -> tuple[list[str], list[str]]:
    """(train, eval) documents of the `dataset: generated` recipes: one language, sample seeds language_seed + 1 and
    + 2 (dsrecipes.train.data reads them; the bench computes its eval blocks' optimum from the same eval text)."""
    return (
        generated_corpus(train_docs, language_seed, language_seed + 1),
        generated_corpus(eval_docs, language_seed, language_seed + 2),
    )


def generated_corpus(num_docs: int, language_seed: int, sample_seed: int) -> list[str]:
    """Documents in the language of `language_seed`; `sample_seed` picks the documents, so train and eval share a
    language but not text. Unigram byte entropy is about 3 nats; the entropy rate (Language.entropy_rate_per_byte)
    is far lower, and a model that learns spellings and successors approaches it."""
    lang, rng = Language(language_seed), random.Random(sample_seed)
    return [lang.document(rng) for _ in range(num_docs)]
