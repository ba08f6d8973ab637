"""The chat fine-tuning (SFT) recipe's own fields (recipes/sft.py); the rest are ModelArguments, DataArguments and
TrainArguments of dsrecipes.config.fields. `dataset` names the chat data: 'generated' (dsrecipes.sft.generated) or a
JSONL file with a `messages` list per line."""

from dataclasses import dataclass
from typing import Optional

from dsrecipes.config.fields import _f


@dataclass
class SftArguments:
    packing: bool = _f(
        False,
        "Pack several conversations into each row of up to block_size tokens, each with position ids from 0 and no "
        "attention across them; per_device_train_batch_size then counts rows. false: one conversation a row, padded.",
    )
    eval_dataset: Optional[str] = _f(
        None,
        "Held-out chat JSONL for eval loss and exact match. Unset: the generated held-out set, or eval_fraction of "
        "the dataset file's conversations.",
    )
    generated_conversations: int = _f(2000, "Generated chat set: training conversations.")
    generated_eval_conversations: int = _f(100, "Generated chat set: held-out conversations.")
    generated_chat_seed: int = _f(7, "Generated chat set: seed of the conversations (generated_seed is the language).")
    generated_chat_words: int = _f(160, "Generated chat set: the user's words come from the first n of the 160.")
    exact_match_max_new_tokens: int = _f(0, "Greedy tokens per held-out answer; 0 = the longest reference + 2.")
    exact_match_batch_size: int = _f(32, "Held-out questions per greedy-generation batch, per process.")
