"""One loader for a trained model: a run's MODEL_DIR or an `itjax.convert` folder -> model, parameters, vocabulary.

    a training run (itjax.train)          MODEL_DIR/config.gin, MODEL_DIR/checkpoints/<step>/state (+ base: PEFT)
    a converted folder (itjax.convert)    OUT/model.gin, OUT/checkpoint, tokenizer files (spiece.model, ...)
                                          [+ OUT/adapter, OUT/adapter.gin: an imported peft LoRA adapter]

`load(path, step)` reads the folder's gin file (extra gin files and bindings override it; no train macro is
required), builds the model and an inference-only `Trainer` (no optimizer) on the run's partitioner, and restores
ONLY the parameters, straight into their shardings: an orbax partial restore of the checkpoint's `state` item
reads its `params` subtree and never the optimizer state (`opt_state`, e.g. AdamW's two moments) nor the input
pipeline's `dataset` item. A PEFT run's parameters are its adapter; its frozen base is loaded from the path the
checkpoint's `base` pointer names and checked against the fingerprint the adapter was trained on. A checkpoint
saved in the other layer layout (per layer `layers/<i>/...` vs stacked `layers/...` [L, ...], `scan_layers`) is
restored in its own layout and converted on device.

Host memory: the parameters are read a group at a time (`_restore_in_groups`) and `load` makes glibc return freed
buffers to the OS (`return_freed_host_memory`). Loading a 254M-parameter AdamW run on one CPU device raises peak
host memory by ~1.2x the parameters' bytes, against ~3.2x for the whole train state (scripts/bench_load_run.py).

The vocabulary is the task's (MIXTURE_OR_TASK_NAME, bound in a run's config.gin or by an override) or else the
folder's tokenizer files. Paths go through `etils.epath`, so `gs://` folders work where orbax does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import optax
import orbax.checkpoint as ocp
from etils import epath

from itjax import config as config_lib
from itjax import partitioning
from itjax.checkpoints import check_compatible, restore_initial_params, restore_peft_base
from itjax.models import scan
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer

log = logging.getLogger("itjax")

RUN_CONFIG = "config.gin"          # MODEL_DIR/config.gin: the run's operative config (itjax.train)
CHECKPOINTS = "checkpoints"        # MODEL_DIR/checkpoints/<step>/{state,dataset,base}
STATE_ITEM, BASE_ITEM = "state", "base"
MODEL_GIN, CONVERTED_CHECKPOINT = "model.gin", "checkpoint"   # OUT/model.gin, OUT/checkpoint (itjax.convert)
RUN, CONVERTED = "run", "converted"


class RunLoadError(ValueError):
    """The path, step or base pointer given to `load` cannot be used; the message names it and what to do."""


@dataclasses.dataclass
class LoadedRun:
    """A model ready for `itjax.inference` (generate_examples / score_examples take `trainer`, `params`).

    Attributes:
      path: the folder loaded (a run's MODEL_DIR or an itjax.convert folder).
      kind: "run" or "converted".
      step: the checkpoint step loaded (None for a converted folder).
      trainer: an inference-only Trainer (model, partitioner, peft; identity optimizer). For a PEFT run,
        `trainer.base_params` holds the frozen base weights (laid out in `trainer.base_shardings`).
      params: the parameter pure dict (PEFT: the adapter) laid out in `trainer.param_shardings`.
      vocabulary: the task's `targets` vocabulary, else the folder's tokenizer; None when neither exists.
      task: the seqio task or mixture named by MIXTURE_OR_TASK_NAME, if bound.
      feature_lengths: TASK_FEATURE_LENGTHS (tokens), if bound.
      initial_checkpoint_path: a run's `train.initial_checkpoint_path` (the folder its weights started from).
    """

    path: str
    kind: str
    step: int | None
    trainer: Trainer
    params: Any
    vocabulary: Any = None
    task: Any = None
    feature_lengths: dict | None = None
    initial_checkpoint_path: str | None = None

    @property
    def model(self):
        return self.trainer.model

    @property
    def peft(self):
        return self.trainer.peft

    @property
    def base_params(self):
        return self.trainer.base_params

    def add_eos(self, feature: str) -> bool:
        """Whether text of `feature` ("inputs" / "targets") gets an EOS appended: the task's feature setting, else
        seqio's default (True)."""
        features = getattr(self.task, "output_features", None) or {}
        return features[feature].add_eos if feature in features else True


def kind_of(path: str) -> str:
    """"run" (config.gin + checkpoints/) or "converted" (model.gin + checkpoint/); RunLoadError otherwise."""
    folder = epath.Path(path)
    if not folder.exists():
        raise RunLoadError(f"{path} does not exist; pass a training run's MODEL_DIR or a folder written by "
                           "`python -m itjax.convert`.")
    if (folder / RUN_CONFIG).exists() and (folder / CHECKPOINTS).is_dir():
        return RUN
    if (folder / MODEL_GIN).exists() and (folder / CONVERTED_CHECKPOINT).is_dir():
        return CONVERTED
    if (folder / RUN_CONFIG).exists():
        raise RunLoadError(f"{path} has {RUN_CONFIG} but no {CHECKPOINTS}/ folder: the run saved no checkpoint yet; "
                           "train it first (python -m itjax.train) or pass another folder.")
    raise RunLoadError(f"{path} is neither a training run's MODEL_DIR ({RUN_CONFIG} + {CHECKPOINTS}/) nor an "
                       f"itjax.convert folder ({MODEL_GIN} + {CONVERTED_CHECKPOINT}/); pass one of those.")


def checkpoint_steps(model_dir: str) -> list[int]:
    """The steps of the finished checkpoints in MODEL_DIR/checkpoints (orbax renames a checkpoint to its step only
    once it is complete; corrupt/ and temporary folders are skipped)."""
    directory = epath.Path(model_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def checkpoint_dir(model_dir: str, step: int) -> str:
    """MODEL_DIR/checkpoints/<step>."""
    return str(epath.Path(model_dir) / CHECKPOINTS / str(step))


def state_dir(model_dir: str, step: int) -> str:
    """MODEL_DIR/checkpoints/<step>/state: the train-state item (step, params, opt_state)."""
    return str(epath.Path(model_dir) / CHECKPOINTS / str(step) / STATE_ITEM)


def load(path: str, step: int | None = None, *, partitioner: Partitioner | None = None,
         gin_files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
         base_path: str | None = None) -> LoadedRun:
    """Loads the model at `path` (a run's MODEL_DIR at checkpoint `step`, default the latest; or an itjax.convert
    folder) with only its parameters read. Clears gin's global config before and after.

    Args:
      path: a run's MODEL_DIR or an itjax.convert output folder.
      step: the run's checkpoint step (default: the latest). Must be None for a converted folder.
      partitioner: mesh and rules to lay the parameters out on (default: the run's `train.partitioner` binding,
        else `Partitioner()`, data parallel over all devices).
      gin_files / bindings / search_paths: parsed after the folder's gin file (later ones win), e.g.
        `["MIXTURE_OR_TASK_NAME = 'quickstart'"]` to take the vocabulary and feature lengths of a task.
      base_path: a PEFT run's base model folder, when it moved from where the checkpoint's pointer says (checked
        against the pointer's fingerprint).

    Raises RunLoadError (bad path, step or base pointer), CheckpointMismatchError (the gin model does not match
    the checkpoint), config_lib.ConfigError (bad gin).
    """
    import gin

    kind = kind_of(path)
    return_freed_host_memory()
    folder = epath.Path(path)
    gin_file = folder / (RUN_CONFIG if kind == RUN else MODEL_GIN)
    import itjax.training  # noqa: F401  (registers the configurables the folder's gin file names)
    from itjax.conversion import peft_import
    # A converted folder with an imported peft LoRA adapter (itjax.convert --peft_adapter): its LoRA settings.
    adapter = [str(folder / peft_import.ADAPTER_GIN)] if kind == CONVERTED and peft_import.has_adapter(path) else []
    gin.clear_config()
    try:
        config_lib.parse_gin([str(gin_file), *adapter, *gin_files], list(bindings), search_paths)
        model = _query("train.model")
        model = config_lib.evaluate(model) if model is not None else config_lib.macro_value("MODEL")
        if model is None:
            raise config_lib.ConfigError(f"{gin_file} (with the given gin files / bindings) binds no model: "
                                         "neither `train.model` nor the `MODEL` macro.")
        peft = config_lib.evaluate(_query("train.peft")) if kind == RUN or adapter else None
        seed = config_lib.evaluate(_query("train.random_seed")) or 0
        if partitioner is None:
            partitioner = _run_partitioner(_query("train.partitioner"))
        task_name = config_lib.macro_value("MIXTURE_OR_TASK_NAME")  # e.g. `@mixture()`: called in the macro's scope
        lengths = config_lib.macro_value("TASK_FEATURE_LENGTHS")
        initial = config_lib.evaluate(_query("train.initial_checkpoint_path")) if kind == RUN else None
    finally:
        gin.clear_config()
    task = None
    if task_name:
        from itjax.data import pipeline
        task = pipeline.get_mixture_or_task(task_name)
    vocabulary = task.output_features["targets"].vocabulary if task is not None else _folder_vocabulary(path)

    if kind == CONVERTED:
        if step is not None:
            raise RunLoadError(f"{path} is an itjax.convert folder: it holds one set of weights, not checkpoint "
                               f"steps; leave the step (--checkpoint_step={step}) out.")
        trainer = Trainer(model, optax.identity(), partitioner, seed=seed, peft=peft)
        if peft is not None:  # the imported adapter on the folder's own weights
            restore_peft_base(trainer, path)
            params = peft_import.restore_initial_adapter(path, trainer.abstract_state["params"])
        else:
            params = restore_initial_params(path, trainer.abstract_state["params"])
    else:
        step = resolve_step(path, step)
        checkpoint = checkpoint_dir(path, step)
        pointer = read_base_pointer(checkpoint) if peft is not None else None
        if pointer is not None and not pointer.get("path"):
            seed = pointer.get("seed", seed)  # the base was initialised from this seed
        trainer = Trainer(model, optax.identity(), partitioner, seed=seed, peft=peft)
        if peft is not None:
            restore_base(trainer, checkpoint, pointer, base_path)
        params = restore_state_params(state_dir(path, step), trainer.abstract_state["params"])
    return LoadedRun(path=str(path), kind=kind, step=step, trainer=trainer, params=params, vocabulary=vocabulary,
                     task=task, feature_lengths=dict(lengths) if lengths else None, initial_checkpoint_path=initial)


def resolve_step(model_dir: str, step: int | None) -> int:
    """`step` (default: the latest) if MODEL_DIR has a finished checkpoint there; RunLoadError listing the steps
    it has otherwise."""
    steps = checkpoint_steps(model_dir)
    if not steps:
        raise RunLoadError(f"{epath.Path(model_dir) / CHECKPOINTS} holds no finished checkpoint; train first "
                           "(python -m itjax.train) or pass another MODEL_DIR.")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise RunLoadError(f"{model_dir} has no checkpoint at step {step}; its checkpoints are at steps "
                           f"{', '.join(map(str, steps))}. Pass one of them (--checkpoint_step) or leave the step "
                           "out for the latest.")
    return step


def read_base_pointer(checkpoint: str) -> dict:
    """The `base` item of a PEFT run's checkpoint folder: {"path", "seed", "fingerprint"} (see
    itjax.checkpoints). RunLoadError when it is missing, unreadable or malformed."""
    item = epath.Path(checkpoint) / BASE_ITEM
    what = ("the adapter cannot be used without knowing its frozen base. Load another step, or retrain the "
            "adapter from its base model")
    if not item.is_dir():
        raise RunLoadError(f"{item} is missing: this PEFT checkpoint has no base pointer; {what}.")
    try:
        with _quiet_item_reads(), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            pointer = checkpointer.restore(item)
    except Exception as e:  # noqa: BLE001  (any read / parse failure is the same problem for the user)
        raise RunLoadError(f"{item}: the base pointer is unreadable ({type(e).__name__}: {e}); {what}.") from None
    if (not isinstance(pointer, dict) or "fingerprint" not in pointer or not isinstance(pointer["fingerprint"], dict)
            or not isinstance(pointer.get("path"), (str, type(None)))):
        raise RunLoadError(f"{item}: the base pointer is malformed (expected {{'path', 'seed', 'fingerprint'}}, "
                           f"got {str(pointer)[:200]}); {what}.")
    return dict(pointer)


def restore_base(trainer: Trainer, checkpoint: str, pointer: dict, base_path: str | None) -> None:
    """Loads a PEFT run's frozen base into `trainer.base_params` from `base_path` or the pointer's path (or its
    seed), checked against the pointer's fingerprint."""
    path = base_path or pointer.get("path")
    if path and not epath.Path(path).exists():
        raise RunLoadError(f"{epath.Path(checkpoint) / BASE_ITEM} points to the base model {path}, which does not "
                           "exist: put the base model (the itjax.convert folder the run started from) back there, or "
                           "pass its new location (itjax.runs.load(..., base_path=DIR)).")
    restore_peft_base(trainer, path, pointer)


_MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_host_memory() -> None:
    """Makes glibc give freed large buffers (>= 1 MiB) back to the OS at once (a fixed `M_MMAP_THRESHOLD`).

    Orbax reads each array into a host buffer and frees it once the array is on its devices; glibc's default
    (a threshold that grows after such frees) keeps those pages in the heap, so host memory stays ~0.4x the
    parameters above what is live (measured by scripts/bench_load_run.py). Called by `load` (process-wide, once;
    a no-op without glibc). Set MALLOC_MMAP_THRESHOLD_ yourself to choose another value."""
    global _MMAP_THRESHOLD_BYTES
    if _MMAP_THRESHOLD_BYTES is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, _MMAP_THRESHOLD_BYTES)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    _MMAP_THRESHOLD_BYTES = None


def restore_state_params(state_dir: str, abstract_params: Any) -> Any:
    """Restores only `params` of a train-state checkpoint item (MODEL_DIR/checkpoints/<step>/state) into the shapes,
    dtypes and shardings of `abstract_params` (ShapeDtypeStruct leaves); the optimizer state is not read.

    A checkpoint in the other layer layout (per layer vs stacked) is restored in its own layout and converted on
    device into `abstract_params`' shardings (transiently two copies of the stacked parameters).
    """
    with _quiet_item_reads(), ocp.PyTreeCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(state_dir)
            metadata = getattr(metadata, "item_metadata", metadata)
        except Exception as e:  # noqa: BLE001  (missing / garbled _METADATA: the same problem for the user)
            raise _unreadable(state_dir, e) from None
        if metadata is None or "params" not in metadata:
            raise _unreadable(state_dir, "its metadata lists no `params`")
        saved = metadata["params"]
        saved_stacked, wanted_stacked = _stacked_layout(saved), _stacked_layout(abstract_params)
        relayout = None not in (saved_stacked, wanted_stacked) and saved_stacked != wanted_stacked
        target = abstract_params
        if relayout:
            target = (scan.unstack_layers(abstract_params) if wanted_stacked
                      else scan.stack_layers(abstract_params, stack=scan.stack_abstract))
        check_compatible(saved, target, f"checkpoint {state_dir}")
        try:
            restored = _restore_in_groups(checkpointer, state_dir, target)
        except Exception as e:  # noqa: BLE001  (truncated / missing array files)
            raise _unreadable(state_dir, e) from None
    if not relayout:
        return restored
    convert = scan.stack_layers if wanted_stacked else scan.unstack_layers
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_params)
    return jax.jit(convert, out_shardings=shardings)(restored)


RESTORE_GROUP_BYTES = 1 << 30  # at most this much of the parameters restored by one orbax call (and >= 1/8)


def _restore_in_groups(checkpointer: ocp.Checkpointer, state_dir: str, target: Any) -> Any:
    """`params` of the state item restored into `target` (a pure dict of ShapeDtypeStruct leaves) a group of
    leaves at a time: orbax reads every array of one call concurrently through a host buffer, so groups of at most
    max(1/8 of the parameters, 1 GiB) bound that transient copy (measured: peak host memory 1.25x -> 1.15x the
    parameters on CPU, scripts/bench_load_run.py). Groups follow the tree's leaf order (the same on every process)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    total = sum(x.size * x.dtype.itemsize for _, x in flat)
    limit = min(max(total // 8, 1), RESTORE_GROUP_BYTES)
    groups, group, size = [], [], 0
    for path, leaf in flat:
        group.append((path, leaf))
        size += leaf.size * leaf.dtype.itemsize
        if size >= limit:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    restored = {}
    for group in groups:
        item = {}
        for path, leaf in group:
            node = item
            for key in path[:-1]:
                node = node.setdefault(key.key, {})
            node[path[-1].key] = leaf
        out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": ocp.checkpoint_utils.construct_restore_args(item)},
            partial_restore=True))["params"]
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            restored[tuple(k.key for k in path)] = leaf
    return jax.tree.unflatten(treedef, [restored[tuple(k.key for k in path)] for path, _ in flat])


def _unreadable(state_dir: str, error: Exception | str) -> RunLoadError:
    why = error if isinstance(error, str) else f"{type(error).__name__}: {str(error)[:300]}"
    return RunLoadError(f"checkpoint {state_dir} is unreadable ({why}); load another step (--checkpoint_step; "
                        "`itjax.train` moves such a checkpoint to checkpoints/corrupt/ when it resumes).")


@contextlib.contextmanager
def _quiet_item_reads():
    """Drops orbax's warning that a checkpoint item has no `_CHECKPOINT_METADATA` (it sits in the step folder,
    one level up: reading one item of a step is expected to miss it)."""
    logger = logging.getLogger("absl")
    drop = lambda record: not str(record.msg).startswith("Metadata file does not exist")  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _stacked_layout(tree: Any) -> bool | None:
    """True if the tree's layer stacks are stacked (`layers/<name>/...`), False if per layer (`layers/<i>/...`),
    None without layers."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    for path, _ in flat:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        stack = scan.layer_stack(keys)
        if stack is not None:
            return stack[1]
    return None


def _folder_vocabulary(path: str):
    """The vocabulary of a folder's tokenizer files, or None when it has none."""
    from itjax.data import vocabularies

    try:
        return vocabularies.get_vocabulary(str(path))
    except (ValueError, FileNotFoundError):
        return None


def _query(name: str):
    import gin

    try:
        return gin.query_parameter(name)
    except ValueError:
        return None


def _run_partitioner(reference) -> Partitioner:
    """The run's partitioner (its gin binding), or `Partitioner()` when unbound; when its mesh does not fit this
    machine's devices, data parallel over all devices (with a warning)."""
    try:
        built = config_lib.evaluate(reference) if reference is not None else Partitioner()
        return built if built is not None else Partitioner()
    except ValueError as e:
        log.warning("The run's partitioner does not fit this machine (%s); loading data parallel over %d "
                    "device(s) instead.", e, jax.device_count())
        # Explicit arguments: the gin bindings that did not fit must not apply again.
        return Partitioner(data=-1, fsdp=1, tensor=1, logical_axis_rules=partitioning.DATA_PARALLEL_RULES)
