"""SeqIO vocabularies for the models itjax trains: SentencePiece (T5 family) and HF `tokenizer.json` (Llama family).

`get_vocabulary(path)` picks one from a file or a model folder (e.g. the output of `python -m itjax.convert`):

    *.model                                   -> seqio.SentencePieceVocabulary
    tokenizer.json, or a folder holding one   -> TokenizersVocabulary
    a folder with spiece.model / tokenizer.model (and no tokenizer.json) -> seqio.SentencePieceVocabulary

`TokenizersVocabulary` wraps a HF `tokenizers.Tokenizer` (byte-level BPE for Llama 3 / Qwen2, SentencePiece-style
BPE for Llama 2 / Mistral). Conventions, chosen so that `[bos] + encode(text) + [eos]` equals what transformers
produces for the same folder:

- `encode` adds no special tokens (the tokenizer's post-processor, e.g. Llama's BOS, is not applied): seqio
  appends EOS itself (`append_eos` / `Feature(add_eos=True)`) and itjax's `DecoderOnlyModel.bos_id` puts BOS before
  the prompt.
- `decode` stops at the first EOS and skips special tokens (as `tokenizer.decode(ids, skip_special_tokens=True)`).
- `bos_id`, `eos_id`, `unk_id` come from the folder's tokenizer_config.json / special_tokens_map.json (None when
  not declared). `pad_id` is seqio's 0, which in these vocabularies is usually a real token (Llama 3: "!"):
  itjax never infers padding from token values (`itjax.data.feature_converters.DecoderFeatureConverter` marks
  real positions with `decoder_segment_ids`), and `decode_tf`, which seqio pads with 0 after EOS, cuts at EOS.
  Trailing padding without an EOS does decode as token 0: pass only the real ids.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from itjax.data import hf_tokenizer

SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")


class TokenizersVocabulary(seqio.Vocabulary):
    """A seqio vocabulary over a HF `tokenizer.json` (see the module docstring for the conventions).

    Args:
      path: a tokenizer.json file, or a folder holding tokenizer.json (plus tokenizer_config.json and / or
        special_tokens_map.json naming bos / eos / unk tokens, as transformers' save_pretrained writes them).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = os.path.join(path, hf_tokenizer.TOKENIZER_JSON) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"TokenizersVocabulary: {file} not found; pass a tokenizer.json file or a HF "
                                    "tokenizer folder holding one.")
        self._path = os.path.abspath(file)
        with open(file, encoding="utf-8") as f:
            self._json = f.read()
        self._tokenizer = Tokenizer.from_str(self._json)
        tokens = hf_tokenizer.special_tokens(os.path.dirname(self._path))
        self._special_ids = {}
        for name, token in tokens.items():
            token_id = None if token is None else self._tokenizer.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"TokenizersVocabulary: {name} {token!r} of {os.path.dirname(self._path)} is not "
                                 f"in the vocabulary of {self._path}.")
            self._special_ids[name] = token_id
        super().__init__(extra_ids=0)

    # -------------------------------------------------------------------------------------- ids and sizes
    @property
    def bos_id(self) -> int | None:
        return self._special_ids["bos_token"]

    @property
    def eos_id(self) -> int | None:
        return self._special_ids["eos_token"]

    @property
    def unk_id(self) -> int | None:
        return self._special_ids["unk_token"]

    @property
    def _base_vocab_size(self) -> int:
        """Every id the tokenizer can produce, added (special) tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # -------------------------------------------------------------------------------------- python
    def _encode(self, s: str) -> list[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        ids = [i for i in ids if 0 <= i < self._base_vocab_size]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    # -------------------------------------------------------------------------------------- TensorFlow
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """A string scalar -> int32 [n]; a string vector -> int32 RaggedTensor [batch, None]."""
        s = tf.convert_to_tensor(s)
        if s.shape.rank == 0:
            ids = tf.numpy_function(lambda x: np.asarray(self._encode(_text(x)), np.int32), [s], tf.int32,
                                    stateful=False)
            ids.set_shape([None])
            return ids
        if s.shape.rank != 1:
            raise ValueError(f"TokenizersVocabulary.encode_tf: expected a string scalar or vector, got shape {s.shape}")

        def encode_batch(texts):
            rows = [self._encode(_text(t)) for t in texts]
            flat = np.asarray([i for row in rows for i in row], np.int32)
            return flat, np.asarray([len(row) for row in rows], np.int64)

        values, lengths = tf.numpy_function(encode_batch, [s], (tf.int32, tf.int64), stateful=False)
        values.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(values, lengths)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids [..., length] -> strings [...] (each row decoded up to its first EOS)."""
        ids = tf.convert_to_tensor(ids)

        def decode_rows(rows):
            return np.asarray([self._decode(row).encode("utf-8") for row in rows.reshape(-1, rows.shape[-1])],
                              dtype=object)

        flat = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
        return tf.reshape(flat, tf.shape(ids)[:-1])

    # -------------------------------------------------------------------------------------- identity
    def __getstate__(self):
        return {"path": self._path, "json": self._json, "special_ids": self._special_ids}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self._path, self._json, self._special_ids = state["path"], state["json"], state["special_ids"]
        self._tokenizer = Tokenizer.from_str(self._json)
        super().__init__(extra_ids=0)

    def __eq__(self, other) -> bool:
        return (isinstance(other, TokenizersVocabulary) and self._json == other._json
                and self._special_ids == other._special_ids)

    def __hash__(self) -> int:
        return hash((self._json, tuple(sorted(self._special_ids.items()))))

    def __str__(self) -> str:
        return (f"TokenizersVocabulary(path={self._path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")

    __repr__ = __str__


def _text(x) -> str:
    """A tf.numpy_function string argument (bytes, or a 0-d object array in eager mode) -> str."""
    return (x.item() if isinstance(x, np.ndarray) else x).decode("utf-8")


def get_vocabulary(path: str) -> seqio.Vocabulary:
    """The seqio vocabulary of a SentencePiece `.model`, a `tokenizer.json`, or a model / tokenizer folder
    (tokenizer.json preferred over spiece.model / tokenizer.model). Raises FileNotFoundError / ValueError
    naming the path when there is nothing to load."""
    if os.path.isfile(path):
        if path.endswith(".model"):
            return seqio.SentencePieceVocabulary(path)
        if path.endswith(".json"):
            return TokenizersVocabulary(path)
        raise ValueError(f"get_vocabulary: {path} is neither a SentencePiece .model nor a HF tokenizer .json file.")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, hf_tokenizer.TOKENIZER_JSON)):
            return TokenizersVocabulary(path)
        for name in SENTENCEPIECE_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return seqio.SentencePieceVocabulary(os.path.join(path, name))
        raise ValueError(f"get_vocabulary: folder {path} holds no {hf_tokenizer.TOKENIZER_JSON} and none of "
                         f"{SENTENCEPIECE_FILES}; point it at the tokenizer files of the model.")
    raise FileNotFoundError(f"get_vocabulary: {path} does not exist.")
