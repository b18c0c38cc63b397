"""itjax.data.vocabularies against transformers: a byte-level BPE tokenizer.json trained here (as Llama 3's: BOS / EOS
special tokens at the end of the vocabulary, a post-processor adding BOS) and `get_vocabulary` on folders.

Parity: `[bos] + vocab.encode(text)` equals the ids of transformers' `AutoTokenizer.from_pretrained(folder)` for
ASCII, unicode and whitespace edge cases; decode round-trips; EOS / BOS ids agree; the TensorFlow paths (seqio's
tokenize / append_eos preprocessors, decode_tf with seqio's post-EOS padding) agree with the Python ones.
"""

import os
import pickle
import random

import numpy as np
import pytest
import seqio
import tensorflow as tf

from itjax.data.vocabularies import TokenizersVocabulary, get_vocabulary

transformers = pytest.importorskip("transformers")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? Größe 你好世界 🙂👍",
    "",
    " ",
    "  two  leading, two trailing  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "numbers 1234567890 and 3.14159, symbols #@$%^&*()",
    "'s 're n't I'm CamelCaseWords snake_case_words",
]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéö"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ""])
            for _ in range(n)] + TEXTS[:3]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A HF tokenizer folder (tokenizer.json + tokenizer_config.json) written by transformers' save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS,
                                         eos_token=EOS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tokenizer_dir):
    return TokenizersVocabulary(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_ids_match_transformers(pair):
    vocab, hf = pair
    assert vocab.bos_id == hf.bos_token_id and vocab.eos_id == hf.eos_token_id
    assert vocab.bos_id == 400 and vocab.eos_id == 401  # special tokens after the BPE pieces, as in Llama 3
    assert vocab.unk_id is None and vocab.pad_id == 0
    assert vocab.vocab_size == len(hf) == 402
    for text in TEXTS:
        ids = list(vocab.encode(text))
        assert [vocab.bos_id] + ids == hf(text).input_ids, text
        assert vocab.decode(ids) == text == hf.decode(ids, skip_special_tokens=True), text


def test_decode_stops_at_eos_and_skips_special_tokens(pair):
    vocab, _ = pair
    ids = list(vocab.encode(TEXTS[2]))
    assert vocab.decode([vocab.bos_id] + ids + [vocab.eos_id] + ids) == TEXTS[2]


def test_tensorflow_paths_match_python(pair):
    vocab, _ = pair
    for text in TEXTS:
        np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), vocab.encode(text))
    ragged = vocab.encode_tf(tf.constant(TEXTS))
    assert [list(row) for row in ragged.numpy()] == [list(vocab.encode(t)) for t in TEXTS]

    # seqio's tokenize + append_eos preprocessors inside a tf.data pipeline (graph mode).
    features = {"targets": seqio.Feature(vocab, add_eos=True)}
    ds = tf.data.Dataset.from_tensor_slices({"targets": TEXTS})
    ds = seqio.preprocessors.append_eos(seqio.preprocessors.tokenize(ds, features), features)
    for text, example in zip(TEXTS, ds.as_numpy_iterator()):
        assert list(example["targets"]) == list(vocab.encode(text)) + [vocab.eos_id]

    # decode_tf: a padded batch where seqio fills everything after EOS with pad_id 0 (a real token here).
    rows = [list(vocab.encode(t)) + [vocab.eos_id] for t in TEXTS[:3]]
    width = max(map(len, rows)) + 2
    batch = np.array([row + [vocab.encode("Hello")[0]] * (width - len(row)) for row in rows], np.int32)
    np.testing.assert_array_equal(vocab.decode_tf(tf.constant(batch)).numpy(), [t.encode() for t in TEXTS[:3]])
    assert vocab.decode_tf(tf.constant(batch[0])).numpy() == TEXTS[0].encode()


def test_pickling_and_equality(tokenizer_dir, pair, tmp_path):
    vocab, _ = pair
    again = pickle.loads(pickle.dumps(vocab))
    assert again == vocab and hash(again) == hash(vocab)
    assert list(again.encode(TEXTS[2])) == list(vocab.encode(TEXTS[2])) and again.eos_id == vocab.eos_id
    assert TokenizersVocabulary(os.path.join(tokenizer_dir, "tokenizer.json")) == vocab
    # Same tokenizer.json, different special tokens: a different vocabulary.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(open(os.path.join(tokenizer_dir, "tokenizer.json")).read())
    (other / "tokenizer_config.json").write_text('{"bos_token": null, "eos_token": "%s"}' % BOS)
    different = TokenizersVocabulary(str(other))
    assert different != vocab and different.bos_id is None and different.eos_id == vocab.bos_id


def test_unknown_special_token_is_reported(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text(open(os.path.join(tokenizer_dir, "tokenizer.json")).read())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(ValueError, match="eos_token '</s>'"):
        TokenizersVocabulary(str(tmp_path))


def test_get_vocabulary(tokenizer_dir, pair, tmp_path):
    vocab, _ = pair
    assert get_vocabulary(tokenizer_dir) == vocab
    assert get_vocabulary(os.path.join(tokenizer_dir, "tokenizer.json")) == vocab
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        get_vocabulary(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_vocabulary(str(tmp_path / "missing"))


def test_get_vocabulary_on_converted_t5_folder(tmp_path):
    """A SentencePiece model carried into an itjax folder by itjax.convert is found as spiece.model."""
    import sentencepiece

    torch = pytest.importorskip("torch")
    from itjax import convert

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(tmp_path / "spiece"), vocab_size=100, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=100, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0))
    hf_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "itjax")
    hf.save_pretrained(hf_dir)
    os.replace(tmp_path / "spiece.model", os.path.join(hf_dir, "spiece.model"))
    convert.main(["--hf_dir", hf_dir, "--out_dir", out_dir])
    expected = seqio.SentencePieceVocabulary(os.path.join(out_dir, "spiece.model"))
    for path in (out_dir, os.path.join(out_dir, "spiece.model")):
        vocab = get_vocabulary(path)
        assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab == expected
    assert list(vocab.encode(TEXTS[1])) == list(expected.encode(TEXTS[1]))
