"""Flax NNX models: the T5 (encoder-decoder) and Llama (decoder-only) families behind one interface.

    base.py             BaseModel: what the trainer, evaluation, inference and the dry run may call
    encoder_decoder.py  EncoderDecoderModel (T5, mT5, Flan-T5) over a `t5.T5` module
    decoder_only.py     DecoderOnlyModel (Llama 2 / 3, Mistral, Qwen2) over a `llama.Llama` module
    decoding.py         greedy, sampling and beam search for any family (`BaseModel.decode_fns`)
    layers.py, scan.py  shared layers; scanning over a layer stack

Importing this package changes no global JAX / Flax state: model variables are created with
`eager_sharding=False` (their logical axis names are metadata that `itjax.partitioning` maps to mesh shardings).
"""
