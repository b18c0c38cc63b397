"""Parameter counts of the real-size gin model files equal the HF models', computed on both sides without allocating.

itjax side: `EncoderDecoderModel(config).abstract_module()` of the config the gin file builds (ShapeDtypeStructs);
a size file includes its family file (gin/models/t5_1_1_family.gin ...), so the sizes are read through gin with the
project's gin/ folder on the search path, as `itjax.convert.t5_config_from_gin` reads them.
HF side: `T5ForConditionalGeneration` of the matching HF config built on the meta device. transformers 5 always ties
`lm_head` to `shared` in the module (v1.1-style checkpoints still carry their own `lm_head.weight`, which
from_pretrained keeps separate), so for untied models the meta model gets its own `lm_head` before counting.
"""

import math
import os

import gin
import jax
import pytest
from flax import nnx

from itjax import config as config_lib
from itjax import convert
from itjax.models.encoder_decoder import EncoderDecoderModel

GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin", "models")

# (d_model, d_ff, d_kv, num_heads, num_layers) per size, from the HF configs / T5X gin files.
V1_1_SIZES = {"small": (512, 1024, 64, 6, 8), "base": (768, 2048, 64, 12, 12), "large": (1024, 2816, 64, 16, 24),
              "xl": (2048, 5120, 64, 32, 24), "xxl": (4096, 10240, 64, 64, 24)}
V1_0_SIZES = {"small": (512, 2048, 64, 8, 6), "base": (768, 3072, 64, 12, 12), "large": (1024, 4096, 64, 16, 24),
              "3b": (1024, 16384, 128, 32, 24), "11b": (1024, 65536, 128, 128, 24)}


def _hf_kwargs(dims, vocab_size, feed_forward, tied):
    d_model, d_ff, d_kv, num_heads, num_layers = dims
    return dict(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=num_heads,
                num_layers=num_layers, feed_forward_proj=feed_forward, tie_word_embeddings=tied)


HF_CONFIGS = {
    **{f"t5_1_1_{s}": _hf_kwargs(d, 32128, "gated-gelu", False) for s, d in V1_1_SIZES.items()},
    **{f"flan_t5_{s}": _hf_kwargs(d, 32128, "gated-gelu", False) for s, d in V1_1_SIZES.items()},
    **{f"mt5_{s}": _hf_kwargs(d, 250112, "gated-gelu", False) for s, d in V1_1_SIZES.items()},
    **{f"t5_1_0_{s}": _hf_kwargs(d, 32128, "relu", True) for s, d in V1_0_SIZES.items()},
}

# Published counts (HF `num_parameters()` of the checkpoints, lm_head included for untied models).
KNOWN_COUNTS = {
    "t5_1_0_small": 60_506_624,  # t5-small
    "t5_1_1_small": 76_961_152,  # google/t5-v1_1-small
    "flan_t5_base": 247_577_856,  # google/flan-t5-base
    "mt5_small": 300_176_768,  # google/mt5-small
}


def _config(name: str):
    """The T5Config gin/models/<name>.gin builds (family file included)."""
    gin.clear_config()
    try:
        config_lib.parse_gin_file(os.path.join(GIN_DIR, f"{name}.gin"))
        return EncoderDecoderModel().config
    finally:
        gin.clear_config()


def _itjax_count(name: str) -> int:
    config = _config(name)
    params = nnx.split(EncoderDecoderModel(config).abstract_module(), nnx.Param)[1]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _hf_count(name: str) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = HF_CONFIGS[name]
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs))
        if not kwargs["tie_word_embeddings"]:
            model.lm_head.weight = torch.nn.Parameter(torch.empty(kwargs["vocab_size"], kwargs["d_model"]))
    return sum(p.numel() for p in model.parameters())


def test_every_size_has_a_gin_file():
    missing = [n for n in HF_CONFIGS if not os.path.exists(os.path.join(GIN_DIR, f"{n}.gin"))]
    assert not missing


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_gin_config_matches_hf_config(name):
    config = _config(name)
    hf = HF_CONFIGS[name]
    expected = convert.t5_config_from_hf({"model_type": "t5", **hf, "num_decoder_layers": hf["num_layers"]})
    assert config == expected


@pytest.mark.parametrize("name", ["t5_1_0_small", "t5_1_0_11b", "t5_1_1_small", "flan_t5_base", "flan_t5_xl",
                                  "flan_t5_xxl", "mt5_small", "mt5_large"])
def test_parameter_count_equals_hf(name):
    count = _itjax_count(name)
    assert count == _hf_count(name)
    if name in KNOWN_COUNTS:
        assert count == KNOWN_COUNTS[name]


def test_flan_t5_xl_count():
    """Flan-T5-XL: 2,849,757,184 parameters in the checkpoint. The issue's 2,783,959,040 is what transformers 5
    reports for it: its module ties lm_head to shared, so the 32128 x 2048 output layer is counted once less."""
    count = _itjax_count("flan_t5_xl")
    assert count == 2_849_757_184
    assert count - 32128 * 2048 == 2_783_959_040
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        tied = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_CONFIGS["flan_t5_xl"]))
    assert tied.num_parameters() == 2_783_959_040


@pytest.mark.parametrize("name", ["t5_1_1_xl", "flan_t5_base", "mt5_small", "t5_1_0_3b"])
def test_convert_reads_the_layered_size_files(name):
    """`itjax.convert.t5_config_from_gin` (a public reader) follows a size file's include of its family file."""
    assert convert.t5_config_from_gin(os.path.join(GIN_DIR, f"{name}.gin")) == _config(name)
