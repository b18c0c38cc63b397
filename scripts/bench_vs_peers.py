"""Benchmark: itjax side by side with HF transformers / peft (PyTorch) on the same shapes and the same weights.

Each row builds the itjax side through the code `itjax.train` / `itjax.infer` run (`Trainer.train_step`,
`Trainer.generate`: the same jitted functions), copies its random initial weights into the HF model (so both
sides compute the same function: training rows check that the first row's logits agree and stop otherwise;
greedy rows print how many generated tokens agree), then times the two sides alternately (ABBA order) in this one
process and prints a markdown table of medians:

    row             itjax                                   HF
    t5_train        T5 v1.1-small, 8 x (512 + 128), fp32    T5ForConditionalGeneration + torch AdamW
    t5_train_bf16   same, bf16 activations + Adafactor      bf16 autocast + transformers Adafactor (report only)
    llama_train     ~100M Llama, packed rows of 1024, b8    LlamaForCausalLM (packed position_ids, no cache)
    llama_lora      LoRA r=8 on q_proj / v_proj             peft LoraConfig(r=8, q_proj / v_proj), AdamW
    t5_gen8/32      greedy + KV cache, 512 in -> 128 new    model.generate(do_sample=False), EOS disabled
    llama_gen8      greedy + KV cache, 256 prompt -> 128    model.generate(do_sample=False), EOS disabled

Training throughput counts input + target token slots per second; generation new tokens per second. "model
TFLOP/s" is `itjax.flops` model FLOPs (PaLM accounting; forward-only, a third of a train step's, for
generation) over the step time, and "% GEMM" its share of a float32 JAX matrix-product rate (2048^2) measured at
the start of the same run. Needs torch, transformers and peft (`pip install -e '.[test]'`).

    python scripts/bench_vs_peers.py                                   # every row, 3 repeats (long on a CPU)
    python scripts/bench_vs_peers.py --rows t5_train,t5_gen8 --repeats 5
    python scripts/bench_vs_peers.py --rows llama_train --llama_remat full   # batch 8 within 24 GB
    python scripts/bench_vs_peers.py --smoke                           # tiny shapes, seconds (the test)
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin-wait after each parallel region by default, so right after an HF call they take CPU
# from the itjax call that follows (Llama 4 x 1024 train step: 20.1-20.7 s after HF calls, 18.3-18.9 s alone, 18.4 s
# in alternation with passive waiting; HF's own step unchanged, 16.4-17.2 s). Set before torch loads its runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import gc
import resource
import sys
import time
from typing import Callable

import gin
import jax
import numpy as np

from itjax import host_memory
from itjax import config as config_lib
from itjax import flops as flops_lib
from itjax import optimizers
from itjax import param_paths
from itjax.conversion import llama as llama_conversion
from itjax.conversion import mapping, t5 as t5_conversion
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.llama import LlamaConfig
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers gin configurables)

ROWS = ("t5_train", "t5_train_bf16", "llama_train", "llama_lora", "t5_gen8", "t5_gen32", "llama_gen8")

# A Llama-style decoder of ~100M parameters (GQA 12 / 4 heads, tied 32000-entry embedding).
LLAMA_100M = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                         num_kv_heads=4, head_dim=64, tie_word_embeddings=True)
LLAMA_TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=True)


@dataclasses.dataclass
class Row:
    """One benchmark row: a callable per side that runs one unit (a train step, a generate call) to completion."""
    name: str
    what: str
    itjax: Callable[[], object]
    hf: Callable[[], object]
    tokens: int  # tokens per call (train: input + target slots; generation: new tokens)
    flops: float  # model FLOPs per call
    check: Callable[[], str] | None = None  # after timing: a consistency note (e.g. greedy agreement)


@dataclasses.dataclass
class Shapes:
    t5_gin: str = "models/t5_1_1_small.gin"
    t5_batch: int = 8
    t5_inputs: int = 512
    t5_targets: int = 128
    llama: LlamaConfig = LLAMA_100M
    llama_batch: int = 8
    llama_length: int = 1024
    llama_segments: int = 4  # packed examples per row
    gen_inputs: int = 512
    gen_new: int = 128
    llama_prompt: int = 256
    llama_remat: str = "none"  # 'full': both sides recompute each layer in backward (itjax scanned layers)
    smoke: bool = False  # tiny shapes (generation rows use batches 2 / 3 instead of 8 / 32)


SMOKE = Shapes(smoke=True, t5_gin="models/t5_1_1_quickstart.gin", t5_batch=2, t5_inputs=16, t5_targets=8,
               llama=LLAMA_TINY, llama_batch=2, llama_length=32, llama_segments=2, gen_inputs=16, gen_new=4,
               llama_prompt=8)


# ------------------------------------------------------------------------------------------------ model builders
def t5_model(shapes: Shapes, dtype: str = "float32"):
    gin.clear_config()  # each row parses the model file again (parse_gin locks the config)
    config_lib.parse_gin([shapes.t5_gin], [f"itjax.models.T5Config.dtype = '{dtype}'"])
    return gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()


def hf_t5(model):
    """HF T5ForConditionalGeneration of the itjax model's config (dropout off), weights filled in later."""
    import transformers
    import torch
    config = dataclasses.replace(model.config, dropout_rate=0.0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_conversion.hf_config_from_t5(config)))
    if not config.tie_word_embeddings:  # transformers 5 ties lm_head to the embedding whatever the config says
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    return hf


def hf_llama(config: LlamaConfig):
    import transformers
    hf_config = transformers.LlamaConfig(**llama_conversion.hf_config_from_llama(config))
    hf_config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_config)


def load_into_hf(hf_model, params, maps) -> None:
    """Copies itjax parameters (a pure dict of arrays) into the HF model through the conversion's tensor maps."""
    import torch
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in
               mapping.export_tensors(jax.device_get(params), maps)}
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise RuntimeError(f"HF model has no tensors {unexpected}")
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    if set(missing) - tied:
        raise RuntimeError(f"weights not copied into the HF model: {sorted(set(missing) - tied)}")


def new_trainer(model, optimizer="adamw", peft=None) -> Trainer:
    tx = optimizers.adamw(1e-3) if optimizer == "adamw" else optimizers.adafactor(1e-3)
    return Trainer(model, tx, Partitioner(devices=jax.devices()[:1]), peft=peft)


# ------------------------------------------------------------------------------------------------ batches
def t5_train_batch(vocab: int, batch: int, inputs: int, targets: int) -> dict[str, np.ndarray]:
    """Random unpacked encoder-decoder rows (seed 0), every token real."""
    rng = np.random.default_rng(0)
    target_tokens = rng.integers(2, vocab, (batch, targets), dtype=np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, vocab, (batch, inputs), dtype=np.int32),
        "decoder_target_tokens": target_tokens,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), target_tokens[:, :-1]], axis=1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }


def llama_packed_batch(vocab: int, batch: int, length: int, segments: int) -> dict[str, np.ndarray]:
    """Random decoder-only rows of `length` tokens packing `segments` equal examples each (seed 0)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, vocab, (batch, length + 1), dtype=np.int32)
    per = length // segments
    segment_ids = np.minimum(np.arange(length) // per + 1, segments).astype(np.int32)
    positions = (np.arange(length) - (segment_ids - 1) * per).astype(np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((batch, length), np.int32),
        "decoder_segment_ids": np.broadcast_to(segment_ids, (batch, length)).copy(),
        "decoder_positions": np.broadcast_to(positions, (batch, length)).copy(),
        "decoder_causal_attention": np.zeros((batch, length), np.int32),
    }


# ------------------------------------------------------------------------------------------------ rows
def _logits_agreement(model, trainer: Trainer, params, batch: dict[str, np.ndarray], hf, hf_args,
                      tolerance: float = 1e-3) -> str:
    """Both sides' logits for the batch's first row, at the weights both start training from: a training row times
    the same function on both sides only if these agree (fp32 summation order: ~1e-6). Raises when the largest
    difference exceeds `tolerance` x max(1, largest logit).

    `hf_args(rows)` gives the HF model's keyword arguments for a row slice."""
    import torch
    first = {k: v[:1] for k, v in batch.items()}
    ours = np.asarray(jax.jit(lambda p, b: model.logits(trainer.module(p), b))(params, first))
    with torch.no_grad():
        theirs = hf(**hf_args(slice(0, 1))).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(ours).max())
    if not diff <= tolerance * max(1.0, scale):
        raise RuntimeError(f"the two sides compute different functions: first-row logits differ by up to {diff:.3g} "
                           f"(largest logit {scale:.3g}); fix the HF call before timing")
    return f"first-row logits agree to {diff:.1e} (largest {scale:.1f})"


def _itjax_train(trainer: Trainer, batch: dict[str, np.ndarray]):
    """(a call running one itjax train step to completion, the dict holding its live state under "state")."""
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    holder = {"state": trainer.init_state()}

    def run_itjax():
        holder["state"], metrics = trainer.train_step(holder["state"], device_batch)
        return jax.block_until_ready(metrics)

    return run_itjax, holder


def _hf_train_step(hf_model, optimizer, forward, autocast_bf16=False):
    import torch
    hf_model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = forward()
        loss.backward()
        optimizer.step()
        return float(loss)
    return step


def t5_train_row(shapes: Shapes, bf16: bool = False) -> Row:
    import torch
    import transformers
    model = t5_model(shapes, "bfloat16" if bf16 else "float32")
    trainer = new_trainer(model, "adafactor" if bf16 else "adamw")
    batch = t5_train_batch(model.config.vocab_size, shapes.t5_batch, shapes.t5_inputs, shapes.t5_targets)
    run_itjax, holder = _itjax_train(trainer, batch)
    hf = hf_t5(model)
    load_into_hf(hf, holder["state"]["params"], t5_conversion.t5_tensor_maps(model.config))
    if bf16:
        opt = transformers.optimization.Adafactor(hf.parameters(), lr=1e-3, scale_parameter=False,
                                                  relative_step=False, warmup_init=False)
    else:
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    hf_args = lambda rows: dict(input_ids=t["encoder_input_tokens"][rows],  # noqa: E731
                                attention_mask=t["encoder_input_tokens"][rows] > 0,
                                decoder_input_ids=t["decoder_input_tokens"][rows])
    forward = lambda: hf(**hf_args(slice(None)), labels=t["decoder_target_tokens"]).loss  # noqa: E731
    # bf16 activations against HF's fp32 forward: rounding, not a different function, at a few percent.
    agreement = _logits_agreement(model, trainer, holder["state"]["params"], batch, hf, hf_args, 5e-2 if bf16 else 1e-3)
    shape = {k: v.shape for k, v in batch.items()}
    what = (f"T5 {shapes.t5_gin.split('/')[-1][:-4]} train, {shapes.t5_batch} x ({shapes.t5_inputs} + "
            f"{shapes.t5_targets}), " + ("bf16 Adafactor" if bf16 else "fp32 AdamW"))
    return Row("t5_train_bf16" if bf16 else "t5_train", what, run_itjax, _hf_train_step(hf, opt, forward, bf16),
               shapes.t5_batch * (shapes.t5_inputs + shapes.t5_targets), trainer.train_step_flops(shape),
               lambda: agreement)


def llama_train_row(shapes: Shapes, lora: bool = False) -> Row:
    import torch
    from itjax.peft import LoRA
    remat = shapes.llama_remat != "none"
    config = dataclasses.replace(shapes.llama, scan_layers=remat, remat_policy=shapes.llama_remat)
    model = DecoderOnlyModel(config)
    trainer = new_trainer(model, peft=LoRA(rank=8, alpha=16.0) if lora else None)
    batch = llama_packed_batch(config.vocab_size, shapes.llama_batch, shapes.llama_length, shapes.llama_segments)
    run_itjax, holder = _itjax_train(trainer, batch)
    hf = hf_llama(config)
    if remat:  # HF's per-decoder-layer activation checkpointing: the same recomputation as remat_policy='full'
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = trainer.base_params if lora else holder["state"]["params"]
    load_into_hf(hf, param_paths.unstack_layers(params), llama_conversion.llama_tensor_maps(config))
    if lora:
        import peft
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    # Packed rows: per-segment position_ids, from which transformers builds the block-diagonal causal mask, but only
    # without a KV cache (`use_cache=False`; with the default cache it attends across the packed examples: plain
    # causal attention, a different and cheaper computation). Labels are shifted inside the model, so they are the
    # inputs (the last position's target is a 1-token difference).
    hf_args = lambda rows: dict(input_ids=t["decoder_input_tokens"][rows],  # noqa: E731
                                position_ids=t["decoder_positions"][rows], use_cache=False)
    forward = lambda: hf(**hf_args(slice(None)), labels=t["decoder_input_tokens"]).loss  # noqa: E731
    agreement = _logits_agreement(model, trainer, holder["state"]["params"], batch, hf, hf_args)
    shape = {k: v.shape for k, v in batch.items()}
    what = (f"Llama {trainer.num_params / 1e6:.0f}M train, {shapes.llama_batch} x {shapes.llama_length} packed, "
            + ("LoRA r=8 q/v" if lora else "fp32 AdamW") + (", both sides recompute layers" if remat else ""))
    return Row("llama_lora" if lora else "llama_train", what, run_itjax, _hf_train_step(hf, opt, forward),
               shapes.llama_batch * shapes.llama_length, trainer.train_step_flops(shape), lambda: agreement)


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> str:
    """Share of rows whose generated tokens agree, and of tokens up to each row's first difference."""
    same = ours == theirs
    prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
    return (f"greedy tokens identical in {int(same.all(1).sum())}/{len(same)} rows; agreeing prefix "
            f"{prefix.mean() / same.shape[1]:.0%} of tokens")


def t5_gen_row(shapes: Shapes, batch_size: int) -> Row:
    import torch
    model = t5_model(shapes)
    trainer = new_trainer(model)
    params = trainer.init_state()["params"]
    rng = np.random.default_rng(1)
    inputs = rng.integers(2, model.config.vocab_size, (batch_size, shapes.gen_inputs)).tolist()
    batch = model.inference_batch(inputs, None, {"inputs": shapes.gen_inputs, "targets": shapes.gen_new}, batch_size)
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    new = shapes.gen_new
    out = {}

    def run_itjax():  # eos_id -1: no token ends a row, every call generates `new` tokens
        out["itjax"] = trainer.generate(params, device_batch, max_decode_length=new, eos_id=-1)
        return jax.block_until_ready(out["itjax"])

    hf = hf_t5(model)
    load_into_hf(hf, params, t5_conversion.t5_tensor_maps(model.config))
    hf.eval()
    hf.generation_config.eos_token_id = None
    ids = torch.from_numpy(batch["encoder_input_tokens"]).long()

    def run_hf():
        with torch.inference_mode():
            out["hf"] = hf.generate(input_ids=ids, attention_mask=ids > 0, max_new_tokens=new, do_sample=False,
                                    num_beams=1, eos_token_id=None, pad_token_id=0)
        return out["hf"]

    def check():
        hf_tokens = out["hf"].numpy()[:, 1:]  # drop the start token
        if hf_tokens.shape[1] != new:
            raise RuntimeError(f"HF generated {hf_tokens.shape[1]} tokens, not {new}: EOS was not disabled")
        return _agreement(np.asarray(out["itjax"]), hf_tokens)

    shape = {"encoder_input_tokens": (batch_size, shapes.gen_inputs), "decoder_target_tokens": (batch_size, new)}
    return Row(f"t5_gen{batch_size}", f"T5 greedy, batch {batch_size}, {shapes.gen_inputs} in -> {new} new",
               run_itjax, run_hf, batch_size * new, trainer.train_step_flops(shape) / 3, check)


def llama_gen_row(shapes: Shapes, batch_size: int = 8) -> Row:
    import torch
    model = DecoderOnlyModel(shapes.llama)
    trainer = new_trainer(model)
    params = trainer.init_state()["params"]
    rng = np.random.default_rng(1)
    prompt, new = shapes.llama_prompt, shapes.gen_new
    inputs = rng.integers(2, shapes.llama.vocab_size, (batch_size, prompt)).tolist()
    batch = model.inference_batch(inputs, None, {"inputs": prompt, "targets": new}, batch_size)
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    out = {}

    def run_itjax():
        out["itjax"] = trainer.generate(params, device_batch, max_decode_length=new, eos_id=-1)
        return jax.block_until_ready(out["itjax"])

    hf = hf_llama(shapes.llama)
    load_into_hf(hf, params, llama_conversion.llama_tensor_maps(shapes.llama))
    hf.eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(inputs).long()

    def run_hf():
        with torch.inference_mode():
            out["hf"] = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                    do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
        return out["hf"]

    def check():
        hf_tokens = out["hf"].numpy()[:, prompt:]
        if hf_tokens.shape[1] != new:
            raise RuntimeError(f"HF generated {hf_tokens.shape[1]} tokens, not {new}: EOS was not disabled")
        return _agreement(np.asarray(out["itjax"]), hf_tokens)

    shape = {"decoder_target_tokens": (batch_size, prompt + new)}
    return Row(f"llama_gen{batch_size}", f"Llama {trainer.num_params / 1e6:.0f}M greedy, batch {batch_size}, "
               f"{prompt} prompt -> {new} new", run_itjax, run_hf, batch_size * new,
               trainer.train_step_flops(shape) / 3, check)


BUILDERS = {
    "t5_train": lambda s: t5_train_row(s),
    "t5_train_bf16": lambda s: t5_train_row(s, bf16=True),
    "llama_train": lambda s: llama_train_row(s),
    "llama_lora": lambda s: llama_train_row(s, lora=True),
    "t5_gen8": lambda s: t5_gen_row(s, 2 if s.smoke else 8),
    "t5_gen32": lambda s: t5_gen_row(s, 3 if s.smoke else 32),
    "llama_gen8": lambda s: llama_gen_row(s, 2 if s.smoke else 8),
}


# ------------------------------------------------------------------------------------------------ timing
WARM_UP_MAX_CALLS = 6  # per side
SETTLED_FAULTS = 10_000  # minor page faults (4 KiB each) a warm call may still add: ~40 MB


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(row: Row) -> int:
    """Calls the two sides alternately until one call of each adds fewer than SETTLED_FAULTS minor page faults
    (at least 2, at most WARM_UP_MAX_CALLS calls per side); returns the calls per side.

    The first calls compile, then grow the process heap until it holds both sides' working sets, which the steady
    state of a training or generation loop never pays (see itjax/host_memory.py). Two calls were not always enough:
    the Llama 4 x 1024 itjax step still took 1.4 million faults (14 s of kernel time) in its second call and 0.25
    million in its third (18.75 s vs 17.6 s settled), which biased the first timed round."""
    for calls in range(1, WARM_UP_MAX_CALLS + 1):
        faults = []
        for fn in (row.itjax, row.hf):
            before = _minor_faults()
            fn()
            faults.append(_minor_faults() - before)
        if calls >= 2 and max(faults) < SETTLED_FAULTS:
            break
    print(f"  {row.name}: {calls} warm-up calls per side (last: itjax {faults[0]:,} page faults, HF {faults[1]:,})",
          file=sys.stderr, flush=True)
    return calls


def time_row(row: Row, repeats: int) -> dict:
    """Warm-up (`warm_up`), then `repeats` rounds in ABBA order; returns median seconds per side."""
    warm_up(row)
    times = {"itjax": [], "hf": []}
    for r in range(repeats):
        order = ("itjax", "hf") if r % 2 == 0 else ("hf", "itjax")
        for side in order:
            fn = row.itjax if side == "itjax" else row.hf
            start = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - start)
        print(f"  {row.name} round {r + 1}: itjax {times['itjax'][-1]:.3f} s, HF {times['hf'][-1]:.3f} s",
              file=sys.stderr, flush=True)
    return {side: float(np.median(t)) for side, t in times.items()} | {"all": times}


def table(results: list[tuple[Row, dict, str]], gemm: float) -> str:
    lines = ["| row | work | itjax tok/s | HF tok/s | itjax / HF | itjax model TFLOP/s (% GEMM) | "
             "HF model TFLOP/s (% GEMM) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row, t, _ in results:
        cells = []
        for side in ("itjax", "hf"):
            rate = row.flops / t[side]
            cells.append(f"{rate / 1e12:.3f} ({100 * rate / gemm:.0f}%)")
        lines.append(f"| {row.name} | {row.what} | {row.tokens / t['itjax']:,.1f} | {row.tokens / t['hf']:,.1f} | "
                     f"{t['hf'] / t['itjax']:.2f}x | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    host_memory.retain_freed_memory()  # as the CLIs do: no per-step page faults (itjax/host_memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "t5_train_bf16"),
                        help=f"comma-separated subset of {','.join(ROWS)} (t5_train_bf16 is slow on XLA:CPU, off by "
                             "default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and row (after the warm-up calls)")
    parser.add_argument("--llama_batch", type=int, default=None, help="override the Llama training batch (8)")
    parser.add_argument("--llama_remat", default="none", choices=["none", "full"],
                        help="'full': the Llama rows recompute each layer in backward on both sides (itjax "
                             "scan_layers + remat_policy='full', HF gradient checkpointing), so batch 8 fits in 24 GB")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="torch.set_num_threads for the HF side (default: torch's own choice); 1 can be the "
                             "faster setting on an oversubscribed machine, where its threads spin at barriers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks that every row runs (seconds)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_vs_peers needs torch, transformers and peft ({e}): pip install -e '.[test]'")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    shapes = SMOKE if args.smoke else Shapes()
    if args.llama_batch:
        shapes = dataclasses.replace(shapes, llama_batch=args.llama_batch)
    shapes = dataclasses.replace(shapes, llama_remat=args.llama_remat)
    gemm = flops_lib.measured_gemm_flops(jax.devices()[0], n=256 if args.smoke else 2048)
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; float32 GEMM "
          f"{gemm / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for name in rows:
        row = BUILDERS[name](shapes)
        print(f"{name}: {row.what}", file=sys.stderr, flush=True)
        t = time_row(row, args.repeats)
        note = row.check() if row.check else ""
        if note:
            print(f"  {name}: {note}", file=sys.stderr, flush=True)
        # Keep the figures only: the callables hold both models and their optimizer states.
        row.itjax = row.hf = row.check = None
        results.append((row, t, note))
        del row
        gc.collect()
    print(f"\nmedians of {args.repeats} alternating calls per side (after warm-up calls until the heap stopped "
          "growing):\n")
    print(table(results, gemm))
    for row, _, note in results:
        if note:
            print(f"{row.name}: {note}")


if __name__ == "__main__":
    main()
