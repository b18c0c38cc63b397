"""Numerical parity of itjax's Llama-family model with transformers on tiny random HF models made in the test.

Cases: Llama 3 (llama3 RoPE scaling, untied), Llama with tied embeddings, Mistral, Mistral with a 4-token
sliding window, Qwen2 (q/k/v biases); all with
hidden 64, 2 layers, 4 query / 2 kv heads, vocab 128. HF weights are perturbed away from their initial values
(norm weights, biases) so every tensor of the mapping matters. Checks: fp32 logits within 1e-4 absolute on a
right-padded batch, packed rows equal to the sequences run separately, greedy generation token-identical to HF
`generate`, left- and right-padded prefill agree, logical axis names on every Param, equal parameter counts, the
same logits with params and activations sharded by the 2D rules on 8 fake devices; and the llama3_1b / llama3_8b /
mistral_7b / qwen2_0_5b gin files' abstract parameter counts against HF's meta-device models.
"""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itjax import config as config_lib  # noqa: E402
from itjax.conversion.llama import hf_config_from_llama, llama_config_from_hf, params_from_hf_state_dict  # noqa: E402
from itjax.models.decoder_only import DecoderOnlyModel  # noqa: E402
from itjax.models.llama import Llama, LlamaConfig  # noqa: E402
from itjax.partitioning import STANDARD_2D_RULES, Partitioner, logical_axes_of  # noqa: E402


def greedy_generate(module, prompt_tokens, prompt_lengths, *, max_new_tokens, eos_id):
    """Greedy continuation of right-padded prompts [batch, l] with prompt_lengths [batch] real tokens, through the
    model interface (`DecoderOnlyModel.generate`) -> [batch, max_new_tokens]."""
    mask = jnp.arange(prompt_tokens.shape[1])[None, :] < prompt_lengths[:, None]
    batch = {"decoder_input_tokens": prompt_tokens, "decoder_causal_attention": mask.astype(jnp.int32)}
    return DecoderOnlyModel(module.config).generate(module, batch, max_decode_length=max_new_tokens, eos_id=eos_id)


GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin", "models")
ALLOWED_PARAM_AXES = {"vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
CASES = {
    "llama3_scaled_untied": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                                            tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, tie_word_embeddings=False)),
    # A window of 4 is shorter than every test sequence (12 tokens; prompts + 8 generated; packed segments 5, 6).
    "mistral_sliding_window": (transformers.MistralConfig, dict(sliding_window=4, tie_word_embeddings=False)),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
}
MODEL_CLASSES = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
                 transformers.MistralConfig: transformers.MistralForCausalLM,
                 transformers.Qwen2Config: transformers.Qwen2ForCausalLM}


def _hf_model(config_cls, extra):
    torch.manual_seed(0)
    hf = MODEL_CLASSES[config_cls](config_cls(**TINY, **extra, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p) if "norm" in name or name.endswith("bias")
                    else 3.0 * p)  # wider than the 0.02 init: well-separated logits for greedy comparisons
    return hf


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    """(HF model, itjax model) with the same weights."""
    hf = _hf_model(*CASES[request.param])
    config = llama_config_from_hf(hf.config.to_dict())
    model = Llama(config, rngs=nnx.Rngs(0))
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    nnx.update(model, params_from_hf_state_dict(state_dict, config))
    return hf, model


def _random_tokens(rng, shape):
    return rng.integers(3, TINY["vocab_size"], size=shape).astype(np.int32)


def test_config_from_hf(pair):
    hf, model = pair
    c = model.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    assert c.attention_bias == (hf.config.model_type == "qwen2")
    assert (c.rope_scaling is not None) == (hf.config.rope_parameters["rope_type"] == "llama3")


def test_logits_match_hf_with_right_padding(pair):
    hf, model = pair
    lengths = np.array([12, 7, 3])
    tokens = _random_tokens(np.random.default_rng(1), (3, 12))
    mask = np.arange(12)[None, :] < lengths[:, None]
    tokens = np.where(mask, tokens, 0)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask, jnp.int32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)
    # Without segment ids right padding changes nothing at real positions (causal attention).
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens)))[mask], got[mask], atol=1e-5, rtol=0)


def test_packed_row_equals_separate_sequences(pair):
    _, model = pair
    rng = np.random.default_rng(2)
    a, b = _random_tokens(rng, (5,)), _random_tokens(rng, (6,))
    tokens = np.concatenate([a, b, [0, 0]])[None]
    segment_ids = np.array([[1] * 5 + [2] * 6 + [0] * 2])
    positions = np.array([list(range(5)) + list(range(6)) + [0, 0]])
    packed = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(positions),
                              segment_ids=jnp.asarray(segment_ids)))[0]
    np.testing.assert_allclose(packed[:5], np.asarray(model(jnp.asarray(a[None])))[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[5:11], np.asarray(model(jnp.asarray(b[None])))[0], atol=1e-5, rtol=0)


def _hf_greedy(hf, prompt, max_new_tokens, eos_id):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(prompt[None], dtype=torch.long),
                          attention_mask=torch.ones((1, len(prompt)), dtype=torch.long), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
    return out[0, len(prompt):].numpy()


def test_greedy_generation_matches_hf(pair):
    hf, model = pair
    rng = np.random.default_rng(3)
    prompts = [_random_tokens(rng, (n,)) for n in (9, 4, 6)]
    tokens = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    # One compilation: eos_id may be traced.
    generate = jax.jit(lambda t, n, eos: greedy_generate(model, t, n, max_new_tokens=8, eos_id=eos))

    # Full-length runs: EOS is a token none of the rows generates.
    unused = min(set(range(TINY["vocab_size"])) - set(np.asarray(generate(jnp.asarray(tokens), lengths, -1)).flat))
    got = np.asarray(generate(jnp.asarray(tokens), lengths, unused))
    expected = [_hf_greedy(hf, p, 8, unused) for p in prompts]
    for row, want in zip(got, expected):
        assert len(want) == 8
        np.testing.assert_array_equal(row, want)

    # EOS = the third token row 0 generates: that row stops at its first occurrence, 0-padded after it.
    eos = int(expected[0][2])
    stop = list(expected[0]).index(eos)
    got = np.asarray(generate(jnp.asarray(tokens), lengths, eos))
    for row, prompt in zip(got, prompts):
        want = _hf_greedy(hf, prompt, 8, eos)
        np.testing.assert_array_equal(row[:len(want)], want)
        assert not row[len(want):].any()
    assert got[0, stop] == eos and not got[0, stop + 1:].any()


def test_left_and_right_padded_prefill_agree(pair):
    _, model = pair
    rng = np.random.default_rng(4)
    prompts = [_random_tokens(rng, (n,)) for n in (7, 3)]
    right, left = np.zeros((2, 7), np.int32), np.zeros((2, 7), np.int32)
    for i, p in enumerate(prompts):
        right[i, :len(p)], left[i, 7 - len(p):] = p, p

    def run(tokens):
        mask = jnp.asarray(tokens != 0)
        logits, positions, cache = model.prefill(jnp.asarray(tokens), mask, model.init_decode_cache(2, 9))
        next_logits, _ = model.decode_step(jnp.argmax(logits, -1).astype(jnp.int32), positions, cache)
        return np.asarray(logits), np.asarray(next_logits), np.asarray(positions)

    (r_logits, r_next, r_pos), (l_logits, l_next, l_pos) = run(right), run(left)
    np.testing.assert_array_equal(r_pos, [7, 3])
    np.testing.assert_array_equal(l_pos, r_pos)
    np.testing.assert_allclose(l_logits, r_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(l_next, r_next, atol=1e-5, rtol=0)
    # The prefill logits of each row equal the teacher-forced logits at its last prompt token.
    full = np.asarray(model(jnp.asarray(right)))
    np.testing.assert_allclose(r_logits, full[[0, 1], [6, 2]], atol=1e-5, rtol=0)


def _params(module):
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_every_param_has_logical_axes_and_hf_count(pair):
    hf, model = pair
    params = _params(model)
    for path, variable in params.items():
        axes = variable.out_sharding
        assert axes is not None and len(axes) == variable.ndim, path
        assert set(axes) <= ALLOWED_PARAM_AXES, (path, axes)
    itjax_count = sum(int(np.prod(v.shape)) for v in params.values())
    assert itjax_count == sum(p.numel() for p in hf.parameters())
    has_bias = any(path[-1] == "bias" for path in params)
    assert has_bias == model.config.attention_bias


def test_conversion_rejects_wrong_shapes():
    hf = _hf_model(*CASES["llama_tied"])
    config = llama_config_from_hf(hf.config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state_dict["model.layers.1.mlp.up_proj.weight"] = state_dict["model.layers.1.mlp.up_proj.weight"][:, :10]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        params_from_hf_state_dict(state_dict, config)
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(8, 8, 8, 1, 2, 1, rope_scaling={"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("name,expected", [("llama3_1b", 1_235_814_400), ("llama3_8b", 8_030_261_248),
                                           ("mistral_7b", 7_241_732_096), ("qwen2_0_5b", 494_032_768)])
def test_gin_sizes_match_hf_parameter_counts(name, expected):
    config_lib.parse_gin_file(os.path.join(GIN_DIR, f"{name}.gin"))
    config = gin.get_configurable(LlamaConfig)()
    assert gin.query_parameter("itjax.models.DecoderOnlyModel.config").configurable.selector == (
        "itjax.models.LlamaConfig")
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    itjax_count = sum(int(np.prod(v.shape)) for v in _params(abstract).values())
    assert itjax_count == expected
    hf_dict = hf_config_from_llama(config)  # llama / mistral (sliding window) / qwen2 (q/k/v biases)
    hf_config = transformers.AutoConfig.for_model(**hf_dict)
    assert type(hf_config).__name__.lower().startswith(hf_dict["model_type"])
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in hf.parameters()) == expected
    assert llama_config_from_hf(hf_config.to_dict()) == config


def test_sharded_2d_mesh_matches_single_device(pair):
    """Params laid out by the 2D rules on a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices: same logits."""
    assert jax.device_count() >= 8, "tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    _, model = pair
    partitioner = Partitioner(data=2, fsdp=2, tensor=2, logical_axis_rules=STANDARD_2D_RULES,
                              devices=jax.devices()[:8])
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    shardings = partitioner.param_shardings(logical_axes_of(state))
    tokens = jnp.asarray(_random_tokens(np.random.default_rng(5), (4, 10)))

    @jax.jit
    def forward(params, tokens):
        with partitioner.axis_rules():
            return nnx.merge(graphdef, _with_values(state, params))(tokens)

    sharded = forward(jax.device_put(params, shardings), jax.device_put(tokens, partitioner.batch_sharding(2)))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(model(tokens)), atol=1e-5, rtol=0)


def _with_values(state, params):
    """A copy of nnx.State `state` holding the arrays of the pure dict `params`."""
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, params)
    return state
