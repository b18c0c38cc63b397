"""Helpers shared by the benchmark task modules (bbh, mmlu): the vocabulary argument and re-registration."""

from __future__ import annotations

import os
from typing import Optional, Union

import seqio


def vocabulary_from(vocabulary: Optional[Union[seqio.Vocabulary, str]], error_cls: type[Exception]) -> seqio.Vocabulary:
    """None: the embedded quickstart vocabulary (offline); a path: that SentencePiece model (missing file:
    `error_cls` naming it); a Vocabulary: itself."""
    if vocabulary is None:
        from itjax.tasks import quickstart  # imported lazily: registering quickstart is not needed otherwise

        return quickstart.get_vocabulary()
    if isinstance(vocabulary, str):
        if not os.path.isfile(vocabulary):
            raise error_cls(f"vocabulary={vocabulary!r}: no SentencePiece model file at that path.")
        return seqio.SentencePieceVocabulary(vocabulary)
    return vocabulary


def replace_in_registry(registry, name: str, **kwargs) -> None:
    """registry.add, replacing an earlier registration of `name` (seqio raises on duplicates)."""
    if name in registry.names():
        registry.remove(name)
    registry.add(name, **kwargs)
