"""O(1) exact resume of the input pipeline: a tf.data iterator restored from its saved state produces exactly the
batches the saved iterator would have produced next (packed rows, a mixture, a tokenizer.json vocabulary), and a
resumed training run reads no consumed example again."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from itjax.data import pipeline
from itjax.data.feature_converters import DecoderFeatureConverter

LENGTHS = {"inputs": 64, "targets": 16}


def _assert_resumes_exactly(tmp_path, name, lengths, make_converter, batch_size=8, consumed=3, compared=4):
    def stream():
        return pipeline.TrainBatches(pipeline.train_dataset(name, lengths, batch_size, make_converter(), seed=7))

    first = stream()
    for _ in range(consumed):
        next(first)
    prefix = str(tmp_path / "process_0-of-1")
    first.save(prefix)
    expected = [next(first) for _ in range(compared)]

    resumed = stream()
    resumed.restore(prefix, consumed)
    got = [next(resumed) for _ in range(compared)]
    assert resumed.batches_consumed == consumed + compared
    for want, have in zip(expected, got):
        assert sorted(want) == sorted(have)
        for key in want:
            np.testing.assert_array_equal(want[key], have[key], err_msg=key)
    # Not the start of the stream again: the restored position differs from a fresh one.
    fresh = next(stream())
    assert not np.array_equal(fresh["decoder_target_tokens"], got[0]["decoder_target_tokens"])


def test_packed_mixture_resumes_exactly(tmp_path):
    _assert_resumes_exactly(tmp_path, "quickstart", LENGTHS, lambda: seqio.EncDecFeatureConverter(pack=True))


def test_decoder_rows_resume_exactly(tmp_path):
    _assert_resumes_exactly(tmp_path, "quickstart", LENGTHS, lambda: DecoderFeatureConverter(pack=True))


@pytest.fixture(scope="module")
def tokenizer_json_task(tmp_path_factory):
    """A task tokenized by a tokenizer.json vocabulary (a tf.numpy_function inside the pipeline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from itjax.data.vocabularies import TokenizersVocabulary

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(400)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "</s>",
                                                                                              "<unk>"],
                                                             show_progress=False))
    folder = tmp_path_factory.mktemp("tokjson")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>", "pad_token": "<pad>"}')
    vocabulary = TokenizersVocabulary(str(folder / "tokenizer.json"))

    def dataset_fn(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts[::-1]})

    name = "resume_test_tokenizer_json"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    features = {k: seqio.Feature(vocabulary, add_eos=True) for k in ("inputs", "targets")}
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
                           output_features=features)
    yield name
    seqio.TaskRegistry.remove(name)


def test_tokenizer_json_pipeline_resumes_exactly(tmp_path, tokenizer_json_task):
    _assert_resumes_exactly(tmp_path, tokenizer_json_task, {"inputs": 24, "targets": 24},
                            lambda: seqio.EncDecFeatureConverter(pack=True))
