"""Chat fine-tuning (SFT): chat JSONL with assistant-only labels, packing, a generated chat set, exact match.

    convs = load_chat_jsonl("data/chat_example.jsonl")             # or generated.generated_chat(...)
    examples, dropped = tokenize_conversations(convs, tok, block_size, where)   # input_ids + labels
    rows = pack(examples, block_size)                               # several conversations per row
    em = exact_match(model, tok, heldout, accelerator)              # greedy answers vs the references

recipes/sft.py wires them into the shared loop (dsrecipes.train.loop).
"""
