"""HF <-> itjax and T5X -> itjax checkpoint conversion (the `python -m itjax.convert` machinery).

    safetensors_io.py   streamed reading of HF safetensors (single file or sharded, bf16 without torch) and the
                        sharded writer
    mapping.py          per-tensor maps HF name <-> itjax parameter path, layout changes, one checked error
    folders.py          the itjax model folder: OUT/checkpoint (params-only orbax), OUT/model.gin, tokenizer files
    hf_tokenizer.py     former home of `itjax.data.hf_tokenizer` (special tokens of a HF tokenizer folder)
    t5.py               T5 / mT5 (encoder-decoder)
    llama.py            Llama 2 / 3, Mistral, Qwen2 (decoder-only)
    t5x.py              T5X checkpoint -> itjax folder (T5 family; names, architecture, checks), reading through
                        t5x_read.py (legacy msgpack + zarr, and orbax formats) and t5x_gin.py (network.T5Config
                        bindings of a T5X config.gin, read with gin's parser, without t5x)
    peft_import.py      a HF peft LoRA adapter -> the converted base + OUT/adapter, OUT/adapter.gin (--peft_adapter)
    runs.py             a training run -> itjax folder (--from_run / --merge_lora; --peft_out adapters)

Each family module exposes `MODEL_TYPES` (HF `model_type`s), `hf_to_itjax(hf_dir, out_dir)` and
`itjax_to_hf(out_dir, hf_dir, max_shard_size, dtype)`; `itjax.convert` dispatches between them.
"""


class ConversionError(ValueError):
    """A checkpoint, config or folder that the converter cannot map; the message names the offending items."""
