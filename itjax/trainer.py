"""Train state and the jitted train / eval / predict steps, laid out over the partitioner's mesh.

The train state is a plain dict pytree `{"step", "params", "opt_state"}` (easy for orbax and for shardings).
Parameters are an nnx pure dict; inside each jitted function the module is rebuilt with `nnx.merge`, so the
compiled step is a pure function of (state, batch) with explicit in/out shardings and a donated state.

Parameter-efficient tuning (`peft`, an `itjax.peft` method): the module is the model plus the method's surgery;
`state["params"]` holds only the adapter (`AdapterParam`s: gradients and optimizer state exist for nothing else)
and the frozen base weights live in `trainer.base_params`, passed to every jitted function as a separate,
non-donated argument with its own shardings.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from itjax import flops
from itjax.models.base import BaseModel
from itjax.partitioning import Partitioner, logical_axes_of
from itjax.peft import core as peft_core

TrainState = dict  # {"step": int32 [], "params": pure dict, "opt_state": optax state}


class Trainer:
    """Owns the compiled functions for one (model, optimizer, mesh) triple.

    Args:
      model: an `itjax.models.base.BaseModel` (EncoderDecoderModel, DecoderOnlyModel); the trainer calls only
        that interface.
      optimizer: an optax GradientTransformation.
      partitioner: mesh and logical-axis rules.
      learning_rate_fn: the schedule, only for logging the current learning rate.
      num_microbatches: gradient accumulation: the global batch is split into this many microbatches whose
        gradients are summed (a `lax.scan`), giving the same update as the full batch.
      seed: parameter-initialisation seed; the dropout key is derived from it too.
      peft: an `itjax.peft` method (LoRA(), PromptTuning(), ...): train only its adapter on a frozen base.
      skip_nonfinite_updates: a step whose loss or gradient norm is NaN / inf changes nothing but the step
        counter, and its metrics carry `skipped` = 1 (train.on_nonfinite_loss='skip').
    """

    def __init__(self, model: BaseModel, optimizer: optax.GradientTransformation, partitioner: Partitioner, *,
                 learning_rate_fn: Callable | float | None = None, num_microbatches: int = 1, seed: int = 0,
                 peft: peft_core.PeftMethod | None = None, skip_nonfinite_updates: bool = False):
        self.model = model
        self.skip_nonfinite_updates = skip_nonfinite_updates
        self.optimizer = optimizer
        self.partitioner = partitioner
        self.num_microbatches = num_microbatches
        self.seed = seed
        self.peft = peft
        self._learning_rate_fn = learning_rate_fn
        self._dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
        self.base_params = None  # peft only: the frozen weights (see init_base_params / checkpoints)

        if peft is None:
            self.graphdef, abstract_params = nnx.split(model.abstract_module(seed), nnx.Param)
            self.base_shardings, self.abstract_base_params = None, None
        else:
            abstract = nnx.eval_shape(lambda: self._peft_module(model.make_module(seed)))
            self.graphdef, abstract_params, abstract_base = nnx.split(abstract, peft_core.AdapterParam, nnx.Param)
            self.base_shardings = partitioner.param_shardings(logical_axes_of(abstract_base))
            self.abstract_base_params = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract_base),
                self.base_shardings)
            peft.check_layout(self.abstract_base_params)
            # The plain model's parameters, what checkpoints hold; the method may store them otherwise (QLoRA).
            plain = nnx.split(model.abstract_module(seed), nnx.Param)[1]
            self.plain_base_shardings = partitioner.param_shardings(logical_axes_of(plain))
            self.abstract_plain_base_params = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(plain),
                self.plain_base_shardings)
            self.base_is_transformed = (jax.tree.structure(self.abstract_plain_base_params)
                                        != jax.tree.structure(self.abstract_base_params))
        param_axes = logical_axes_of(abstract_params)
        abstract_params = nnx.to_pure_dict(abstract_params)
        self.param_shardings = partitioner.param_shardings(param_axes)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        self.state_shardings: TrainState = {
            "step": partitioner.replicated,
            "params": self.param_shardings,
            "opt_state": partitioner.optimizer_state_shardings(abstract_opt, abstract_params, self.param_shardings),
        }
        abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                          "opt_state": abstract_opt}
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, self.state_shardings)
        self._train_step = None
        self._eval_step = None
        self._generate = {}  # compiled generate functions by everything that changes the program
        self._score = None

    # ----------------------------------------------------------------------------------------------- state
    @property
    def num_trainable_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state["params"]))

    @property
    def num_params(self) -> int:
        """All parameters of the model (with peft: adapter + frozen base)."""
        base = jax.tree.leaves(self.abstract_plain_base_params) if self.peft is not None else []
        return self.num_trainable_params + sum(int(np.prod(x.shape)) for x in base)

    @property
    def optimizer_state_bytes(self) -> int:
        """Global size of the optimizer state (all devices together)."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self.abstract_state["opt_state"]))

    def train_step_flops(self, batch_shapes: Mapping[str, tuple[int, ...]]) -> float:
        """Model FLOPs of one train step on a global batch of these feature shapes (`itjax.flops`)."""
        frozen = self.abstract_plain_base_params if self.peft is not None else None  # float32 shapes
        return flops.train_step_flops(self.model.attention_shape(), self.abstract_state["params"], frozen,
                                      batch_shapes)

    def summary(self) -> str:
        """One line for the start-of-run log: parameter counts and optimizer-state size."""
        opt = f"optimizer state {self.optimizer_state_bytes / 2**20:,.2f} MiB"
        if self.peft is None:
            return f"Model: {self.num_params:,} parameters, all trainable; {opt}."
        share = 100.0 * self.num_trainable_params / max(self.num_params, 1)
        return (f"Model: {self.num_params:,} parameters, {self.num_trainable_params:,} trainable ({share:.4f}%, "
                f"{self.peft!r}); {opt}.")

    def _peft_module(self, module: nnx.Module) -> nnx.Module:
        """The method's surgery with its own key stream, so the base weights do not depend on the adapter."""
        return self.peft.apply(module, nnx.Rngs(params=jax.random.fold_in(jax.random.key(self.seed), 2)))

    def init_base_params(self):
        """peft: freshly initialised base weights (the plain model's, from `seed`, as `prepare_base` stores them),
        in their shardings. A quantized base is initialised and quantized in one program (no float32 copy kept)."""
        if not self.base_is_transformed:
            return self.init_plain_base_params()
        return jax.jit(lambda: self._transform_base(self._plain_init()), out_shardings=self.base_shardings)()

    def _plain_init(self):
        return nnx.to_pure_dict(nnx.split(self.model.make_module(self.seed), nnx.Param)[1])

    def init_plain_base_params(self):
        """peft: the plain model's freshly initialised parameters (from `seed`), in `plain_base_shardings`."""
        return jax.jit(self._plain_init, out_shardings=self.plain_base_shardings)()

    def prepare_base(self, plain):
        """peft: the frozen base as the method stores it, from the plain model's parameters `plain` (a pure dict
        like `abstract_plain_base_params`): unchanged, or quantized (LoRA.base_quantization)."""
        if not self.base_is_transformed:
            return plain
        return jax.jit(self._transform_base, in_shardings=(self.plain_base_shardings,),
                       out_shardings=self.base_shardings)(plain)

    def _transform_base(self, base):
        """Traced: the method's surgery on the plain model holding `base`; its frozen part (a pure dict)."""
        module = self.model.make_module(self.seed)  # random values are replaced: XLA drops them
        state = nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(state, base)
        nnx.update(module, state)
        return nnx.to_pure_dict(nnx.split(self._peft_module(module), peft_core.AdapterParam, nnx.Param)[2])

    def init_state(self) -> TrainState:
        """Freshly initialised parameters and optimizer state, created directly in their shardings.

        With peft the parameters are the adapter, initialised on top of `self.base_params` (fresh from `seed`
        when unset): some initialisations read base weights (prompt tuning's sampled vocabulary embeddings).
        """
        if self.peft is None:
            def init():
                params = nnx.to_pure_dict(nnx.split(self.model.make_module(self.seed), nnx.Param)[1])
                return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}
            return jax.jit(init, out_shardings=self.state_shardings)()
        if self.base_params is None:
            self.base_params = self.init_base_params()

        def init_adapter(base):
            module = self.model.make_module(self.seed)  # random base values are dead code: XLA drops them
            if not self.base_is_transformed:  # a quantized base is not the plain module's (LoRA's init ignores it)
                state = nnx.state(module, nnx.Param)
                nnx.replace_by_pure_dict(state, base)
                nnx.update(module, state)
            params = nnx.to_pure_dict(nnx.split(self._peft_module(module), peft_core.AdapterParam, nnx.Param)[1])
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}
        return jax.jit(init_adapter, in_shardings=(self.base_shardings,),
                       out_shardings=self.state_shardings)(self.base_params)

    def module(self, params, base=None) -> nnx.Module:
        """The model with `params` (with peft: the adapter, on `base`, default `self.base_params`)."""
        if self.peft is None:
            return nnx.merge(self.graphdef, nnx.State(params))
        base = self.base_params if base is None else base
        if base is None:
            raise ValueError("Trainer.module: this PEFT trainer has no base weights yet; set trainer.base_params "
                             "(init_base_params() or itjax.checkpoints.restore_peft_base).")
        return nnx.merge(self.graphdef, nnx.State(params), nnx.State(base))

    def _base(self):
        """The extra, non-donated argument of every jitted function: the frozen base (None without peft)."""
        if self.peft is not None and self.base_params is None:
            raise ValueError("Trainer: set trainer.base_params before running a PEFT model (init_base_params() "
                             "or itjax.checkpoints.restore_peft_base).")
        return self.base_params

    # ----------------------------------------------------------------------------------------------- train
    def _batch_shardings(self, batch: Mapping[str, Any]):
        return {k: self.partitioner.batch_sharding(np.ndim(v)) for k, v in batch.items()}

    def _jitted_train_step(self, batch: Mapping[str, Any]):
        if self._train_step is None:
            self._train_step = jax.jit(
                self._train_step_impl,
                in_shardings=(self.state_shardings, self._batch_shardings(batch), self.base_shardings),
                out_shardings=(self.state_shardings, self.partitioner.replicated), donate_argnums=(0,))
        return self._train_step

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimizer update on a global batch. Returns (new state, scalar metrics)."""
        step = self._jitted_train_step(batch)
        with self.partitioner.axis_rules():
            return step(state, batch, self._base())

    def compile_train_step(self, abstract_batch: Mapping[str, jax.ShapeDtypeStruct]):
        """Lowers and compiles the train step for abstract shapes only (no weights allocated): the dry run."""
        step = self._jitted_train_step(abstract_batch)
        with self.partitioner.axis_rules():
            return step.lower(self.abstract_state, abstract_batch, self.abstract_base_params).compile()

    def _loss(self, params, microbatch: Mapping[str, jax.Array], key: jax.Array, *, base, divisor):
        """The objective the train step differentiates, on one (micro)batch carrying its loss weights in
        `_weights` [batch, length]: (loss_sum / divisor, the model's loss terms). `key` draws model and adapter
        dropout (when enabled). Gradients are taken w.r.t. `params` only: with peft the adapter; `base` is a
        constant here."""
        adapter_dropout = self.peft is not None and self.peft.dropout_rate > 0
        with peft_core.adapter_dropout(jax.random.fold_in(key, 2) if adapter_dropout else None):
            terms = self.model.loss_terms(self.module(params, base), microbatch, microbatch["_weights"],
                                          dropout_rng=key if self.model.dropout_enabled else None)
        return terms["loss_sum"] / divisor, terms

    def train_loss(self, params, batch: Mapping[str, jax.Array], step, base=None) -> tuple[jax.Array, dict]:
        """The training loss of a global batch at `step` (its dropout keys), as `train_step` computes it without
        microbatches: (scalar loss, loss terms). Traceable; the dry run measures its saved activations."""
        weights, divisor = self.model.loss_weights(batch)
        key = jax.random.fold_in(self._dropout_key, step)
        return self._loss(params, dict(batch, _weights=weights), key, base=base, divisor=divisor)

    def _train_step_impl(self, state: TrainState, batch: Mapping[str, jax.Array], base=None):
        weights, divisor = self.model.loss_weights(batch)
        batch = dict(batch, _weights=weights)
        step_key = jax.random.fold_in(self._dropout_key, state["step"])
        loss_fn = functools.partial(self._loss, base=base, divisor=divisor)

        grad_fn = jax.grad(loss_fn, has_aux=True)
        m = self.num_microbatches
        if m == 1:
            grads, terms = grad_fn(state["params"], batch, step_key)
        else:
            # Row r of the global batch goes to microbatch r % m: every device contributes to every microbatch,
            # so the batch sharding is kept inside the scan.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1), batch)

            def accumulate(carry, xs):
                index, microbatch = xs
                g, t = grad_fn(state["params"], microbatch, jax.random.fold_in(step_key, index))
                return jax.tree.map(jnp.add, carry, (g, t)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state["params"],
                                                                 jax.tree.map(lambda x: x[0], micro), step_key))
            (grads, terms), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))

        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": terms["loss_sum"] / divisor,
            "z_loss": terms["z_loss_sum"] / divisor,
            "accuracy": terms["correct"] / jnp.maximum(terms["tokens"], 1.0),
            "target_tokens": terms["tokens"],
            # Non-padding input + target tokens (a decoder-only row holds both in decoder_target_tokens).
            "text_tokens": sum(jnp.sum(batch[k] != 0) for k in ("encoder_input_tokens", "decoder_target_tokens")
                               if k in batch).astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self._learning_rate(state["step"]),
        }
        if self.skip_nonfinite_updates:
            # A NaN / inf loss or gradient leaves parameters and optimizer state as they were (the step counter
            # and the data stream still advance); the host counts skips from metrics["skipped"].
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state["params"])
            opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
            metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def _learning_rate(self, step):
        fn = self._learning_rate_fn
        if fn is None:
            return jnp.float32(jnp.nan)
        return jnp.asarray(fn(step) if callable(fn) else fn, jnp.float32)

    # ------------------------------------------------------------------------------------------------ eval
    def eval_step(self, params, batch: Mapping[str, jax.Array]) -> dict:
        """Teacher-forced sums over a batch: loss (mean over real target tokens when divided), correct, tokens."""
        if self._eval_step is None:
            def impl(params, batch, base):
                weights = (batch["decoder_loss_weights"] > 0).astype(jnp.float32)
                return self.model.loss_terms(self.module(params, base), batch, weights)
            self._eval_step = jax.jit(impl, in_shardings=self._in_shardings(batch),
                                      out_shardings=self.partitioner.replicated)
        with self.partitioner.axis_rules():
            return self._eval_step(params, batch, self._base())

    def _in_shardings(self, batch):
        """in_shardings of (params, batch, base) for the eval / predict / score functions."""
        return (self.param_shardings, self._batch_shardings(batch), self.base_shardings)

    def generate(self, params, batch: Mapping[str, jax.Array], *, max_decode_length: int, eos_id: int,
                 method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 rng: jax.Array | None = None, num_beams: int = 4, alpha: float = 0.6) -> jax.Array:
        """Decodes every row of a global batch with the model's KV cache: the one compiled generate path
        (evaluation, `itjax.inference` / `itjax.infer`, notebooks).

        Args:
          params: the trained parameters (with peft: the adapter; the base is `self.base_params`).
          batch: unpacked model features, int32 [batch, length] (`model.inference_batch` or the feature
            converter's rows; decoder-only rows hold the prompt marked by `decoder_causal_attention`).
          max_decode_length: number of tokens to generate (static).
          eos_id: where a row stops (T5: 1; Llama 3: 128001 ...).
          method: "greedy", "sample" (temperature, top_k, top_p; rng required when temperature > 0) or "beam"
            (num_beams, alpha); options of the other methods are ignored.
          rng: PRNG key for sampling (an argument of the compiled function: new keys do not recompile).

        Returns:
          int32 [batch, max_decode_length]: generated tokens, EOS included, 0 after EOS (batch-sharded).

        Compiled once per (method, its options, max_decode_length, eos_id, whether rng is given, batch feature
        names and ranks); array shapes are jit's own cache key.
        """
        if method == "greedy":
            options = {}
        elif method == "sample":
            options = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}
            if options["temperature"] > 0 and rng is None:
                raise ValueError("Trainer.generate: method='sample' with temperature > 0 needs rng "
                                 "(e.g. jax.random.key(seed)).")
        elif method == "beam":
            options = {"num_beams": int(num_beams), "alpha": float(alpha)}
        else:
            raise ValueError(f"Trainer.generate: method={method!r}; expected 'greedy', 'sample' or 'beam'.")
        eos_id = int(eos_id)
        key = (method, tuple(sorted(options.items())), int(max_decode_length), eos_id, rng is None,
               tuple(sorted((k, np.ndim(v)) for k, v in batch.items())))
        if key not in self._generate:
            def impl(params, batch, base, rng):
                return self.model.generate(self.module(params, base), batch, max_decode_length=max_decode_length,
                                           eos_id=eos_id, method=method, rng=rng, **options)
            self._generate[key] = jax.jit(impl, in_shardings=self._in_shardings(batch) + (None,),
                                          out_shardings=self.partitioner.batch_sharding(2))
        with self.partitioner.axis_rules():
            return self._generate[key](params, batch, self._base(), rng)

    def predict(self, params, batch: Mapping[str, jax.Array], max_decode_length: int, eos_id: int = 1) -> jax.Array:
        """Greedy decoding: [batch, max_decode_length] token ids (`generate` with method='greedy')."""
        return self.generate(params, batch, max_decode_length=max_decode_length, eos_id=eos_id)

    def score(self, params, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Per-example target log-likelihood [batch] (nats)."""
        if self._score is None:
            self._score = jax.jit(lambda p, b, base: self.model.score(self.module(p, base), b),
                                  in_shardings=self._in_shardings(batch),
                                  out_shardings=self.partitioner.batch_sharding(1))
        with self.partitioner.axis_rules():
            return self._score(params, batch, self._base())
