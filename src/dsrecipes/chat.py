"""Chat formatting: the default chat template (system / user / assistant turns) and the helper that picks it.

    tok.chat_template = chat_template(tok)          # the model's own template if it has one, else the default
    text = render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)

The default renders each turn as `<|ROLE|>\\n` + content + the EOS token + `\\n`; the generation prompt is
`<|assistant|>\\n`, so a model trained on it (SFT) ends its answer with EOS. Plain text markers: the byte tokenizer
needs no new tokens. Used by dsrecipes.serve (POST /v1/chat/completions) and meant for SFT data.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ eos_token ~ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_template(tok) -> str:
    """The tokenizer's own chat template when it has one, else DEFAULT_CHAT_TEMPLATE."""
    own = getattr(tok, "chat_template", None)
    return own if isinstance(own, str) and own.strip() else DEFAULT_CHAT_TEMPLATE


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """messages ({"role", "content": str}) -> the prompt text, with the template chat_template(tok) picks."""
    return tok.apply_chat_template(
        messages, chat_template=chat_template(tok), tokenize=False, add_generation_prompt=add_generation_prompt
    )
