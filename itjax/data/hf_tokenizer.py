"""The special tokens of a HF tokenizer folder (tokenizer.json + tokenizer_config.json / special_tokens_map.json),
without transformers, TensorFlow or seqio. Read by `itjax.data.vocabularies` and by `itjax.conversion`."""

from __future__ import annotations

import json
import os

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def special_tokens(folder: str) -> dict[str, str | None]:
    """{'bos_token', 'eos_token', 'unk_token', 'pad_token'} -> token string or None, from tokenizer_config.json
    (transformers writes strings or AddedToken dicts {'content': ...}), then special_tokens_map.json."""
    found: dict[str, str | None] = {name: None for name in SPECIAL_TOKEN_NAMES}
    for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = json.load(f)
        for name in SPECIAL_TOKEN_NAMES:
            value = data.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if found[name] is None and isinstance(value, str):
                found[name] = value
    return found


def special_token_ids(folder: str) -> dict[str, int | None]:
    """Like `special_tokens` but ids from `folder/tokenizer.json` (None when absent from the vocabulary)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER_JSON))
    return {name: (None if token is None else tokenizer.token_to_id(token))
            for name, token in special_tokens(folder).items()}
