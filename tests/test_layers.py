"""layers.project_together: one product for same-input projections, exactly the per-layer function."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itjax.models.layers import Dense, project_together


def _dense(seed: int, out=(3, 4)) -> Dense:
    axes = ("embed", "mlp") if isinstance(out, int) else ("embed", "heads", "kv")
    return Dense(8, out, kernel_axes=axes, rngs=nnx.Rngs(seed),
                 kernel_init=jax.nn.initializers.normal(1.0))


class _Scaled(Dense):  # a wrapped layer (as LoRA / (IA)3 are): must not be fused
    def __call__(self, x):
        return 2.0 * super().__call__(x)


def test_fused_projections_equal_the_layers_and_their_gradients():
    layers = [_dense(i) for i in range(3)]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    fused = project_together(layers, x)
    for layer, y in zip(layers, fused):
        np.testing.assert_allclose(y, layer(x), rtol=1e-5, atol=1e-5)
        assert y.shape == (2, 5, 3, 4)

    graphdef, params = nnx.split(layers)

    def loss(params, fuse):
        merged = nnx.merge(graphdef, params)
        ys = project_together(merged, x) if fuse else [layer(x) for layer in merged]
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(ys))

    fused_grads, reference_grads = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(reference_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_wrapped_or_differently_shaped_layers_run_one_by_one():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
    wrapped = _Scaled(8, 4, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(3),
                      kernel_init=jax.nn.initializers.normal(1.0))
    plain = _dense(4, out=4)
    out = project_together([plain, wrapped], x)
    np.testing.assert_allclose(out[1], wrapped(x), rtol=1e-6)
    np.testing.assert_allclose(out[1], 2.0 * (x @ wrapped.kernel[...]), rtol=1e-5)
    mixed = project_together([_dense(5, out=4), _dense(6, out=(2, 2))], x)
    assert [y.shape for y in mixed] == [(2, 4), (2, 2, 2)]
