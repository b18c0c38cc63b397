"""Former home of `itjax.data.hf_tokenizer` (the special tokens of a HF tokenizer folder); its names stay
importable from here."""

from itjax.data.hf_tokenizer import (SPECIAL_TOKEN_NAMES, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG,  # noqa: F401
                                     TOKENIZER_JSON, special_token_ids, special_tokens)
