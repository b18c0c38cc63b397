"""Input pipeline: seqio datasets -> per-host numpy batches -> global jax arrays.

Each process reads its own shard of the data (`seqio.ShardInfo(process_index, process_count)`) and produces
`batch_size / process_count` rows; `to_global` assembles the global batch across processes.

Resume is O(1) and exact, as in T5X: `TrainBatches` wraps the tf.data iterator of the training stream, and each
process saves that iterator's state (shuffle buffers, mixture sampler, packing buffers, file positions; a few MB)
with every checkpoint (`itjax.checkpoints`), so a resumed run continues with the very next batch without reading
the consumed examples again. Python functions inside a pipeline (`tf.numpy_function` tokenizers such as the
tokenizer.json vocabularies) have no state to save: tf.data is told to ignore their "external state", which is
right for pure functions, and wrong only for a task whose source is a Python generator
(`tf.data.Dataset.from_generator`): register such data through `seqio.FunctionDataSource` returning a
`from_tensor_slices` dataset (as every itjax task does) or a file-backed source.
"""

from __future__ import annotations

import difflib
from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from itjax.config import ConfigError


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """Looks up a registered seqio task or mixture, with a clear error listing near matches."""
    import itjax.tasks  # noqa: F401  (registers the built-in tasks)
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Registered: {', '.join(known[:20])}..."
        raise ConfigError(f"MIXTURE_OR_TASK_NAME={name!r} is not a registered seqio task or mixture.{hint} "
                          "Register it in a module under tasks/ (see README, 'Register a task') and import it, "
                          "e.g. via gin `import my_tasks`.") from None


def check_feature_lengths(task: seqio.Task | seqio.Mixture, task_feature_lengths: Mapping[str, int]) -> None:
    """TASK_FEATURE_LENGTHS must give a positive length for every output feature of the task."""
    features = task.output_features
    missing = [k for k in features if k not in task_feature_lengths]
    if missing:
        raise ConfigError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} has no length for feature(s) "
                          f"{missing} of {task.name!r}; set e.g. --gin.TASK_FEATURE_LENGTHS=\"{{'inputs': 256, "
                          f"'targets': 32}}\".")
    bad = {k: v for k, v in task_feature_lengths.items() if not isinstance(v, int) or v <= 0}
    if bad:
        raise ConfigError(f"TASK_FEATURE_LENGTHS: lengths must be positive integers, got {bad}.")


def train_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  feature_converter: seqio.FeatureConverter, *, seed: int, split: str = "train",
                  skip_batches: int = 0) -> tf.data.Dataset:
    """The infinite, shuffled training stream of this host's batches ([batch_size / process_count, length]).

    `skip_batches` fast-forwards a resumed run to the batch an uninterrupted run would see next.
    """
    get_mixture_or_task(mixture_or_task_name)  # registers the built-in tasks; clear error for unknown names
    if batch_size % jax.process_count():
        raise ConfigError(f"BATCH_SIZE={batch_size} must be divisible by the number of processes "
                          f"({jax.process_count()}).")
    ds = seqio.get_dataset(
        mixture_or_task_name, task_feature_lengths, feature_converter, dataset_split=split, shuffle=True,
        num_epochs=None, shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()), seed=seed,
        batch_size=batch_size // jax.process_count(), verbose=False)
    if skip_batches:
        ds = ds.skip(skip_batches)
    options = tf.data.Options()
    # Our Python stages (tokenizers) are pure functions: their "state" is nothing to checkpoint (module docstring).
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


class TrainBatches:
    """This host's training batches (dicts of numpy arrays [local_batch, length]) with a checkpointable position.

    `save(prefix)` writes the state of the underlying tf.data iterator (`tf.train.Checkpoint`, files `prefix.*`);
    `restore(prefix)` puts a freshly built iterator of the same pipeline back at that position. The batches after
    a restore are exactly the batches the saved iterator would have produced next.
    """

    def __init__(self, ds: tf.data.Dataset):
        self._iterator = iter(ds)
        self.batches_consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.batches_consumed += 1
        return {name: value.numpy() for name, value in batch.items()}

    def save(self, prefix: str) -> None:
        tf.train.Checkpoint(iterator=self._iterator).write(prefix)

    def restore(self, prefix: str, batches_consumed: int) -> None:
        tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
        self.batches_consumed = batches_consumed


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches as dicts of numpy arrays [local_batch, length]."""
    return ds.as_numpy_iterator()


def to_global(batch: Mapping[str, np.ndarray], sharding_for_ndim, *, host_local: bool = True) -> dict[str, jax.Array]:
    """Turns numpy arrays into global jax arrays.

    host_local=True: each process holds its own rows (training). host_local=False: every process holds the same
    full batch (evaluation), and each device takes its slice.
    """
    out = {}
    for name, value in batch.items():
        sharding = sharding_for_ndim(value.ndim)
        if host_local:
            out[name] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out
