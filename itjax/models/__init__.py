"""Flax NNX models: the T5 family (encoder-decoder), shared layers and decoding."""

from flax import nnx

# Logical axis names on parameters (`out_sharding=('embed', 'mlp')`, formerly `sharding_names`) are metadata only:
# `itjax.partitioning` maps them to mesh shardings. Without this, flax 0.12 shards every Variable eagerly at creation
# and refuses logical names outside a mesh context.
nnx.use_eager_sharding(False)
