"""Tokenizer: a built-in character-level tokenizer (no downloads) or a local HF tokenizer."""

from __future__ import annotations

import os
import string

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = [c for c in string.printable if c in "\n" or c.isprintable()]  # printable ASCII + newline
ROLES = ("system", "user", "assistant")

# "<role>: content\n" per message; assistant content (with its eos) sits inside {% generation %}
# so apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly those tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ message['role'] + ': ' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per printable ASCII char or newline (~104 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    # BPE without merges and without pre-tokenizer = one token per character, <unk> otherwise.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=10**9,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(path: str | None = None) -> PreTrainedTokenizerFast:
    """Return the built-in char tokenizer (``path=None``) or ``AutoTokenizer`` from a local dir.

    The model's vocabulary size should be ``len(tokenizer)``.
    """
    if path is None:
        return _char_tokenizer()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
