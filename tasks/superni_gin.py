"""SuperNI registration from gin: `register_superni`, `superni_mixture` and `superni_epoch_steps` as gin
configurables. Import this module from gin (`import itjax.tasks.superni_gin`, e.g. as the first binding of a
study), not from `itjax.tasks`: gin refuses new configurables once a run has locked its configuration, and
`itjax.tasks` is imported lazily, after that.

    import itjax.tasks.superni_gin
    register_superni.data_dir = '/data/natural-instructions'
    register_superni.downstream_splits = True
    register_superni.num_downstream_train_instances = 100
    MIXTURE_OR_TASK_NAME = @superni_mixture()          # all test tasks (MTL); superni_mixture.task: one (STL)
    TRAIN_STEPS = @superni_epoch_steps()              # 2 epochs (Tk-Instruct) of the run's train examples
    superni_epoch_steps.batch_size = %BATCH_SIZE
    superni_epoch_steps.mixture_or_task_name = %MIXTURE_OR_TASK_NAME
"""

from __future__ import annotations

import math
from typing import Optional

import gin
import seqio

from itjax.tasks import superni

register_superni = gin.external_configurable(superni.register_superni, "register_superni")


@gin.configurable
def superni_mixture(task: Optional[str] = None, role: str = "test") -> str:
    """Registers SuperNI with the gin-bound `register_superni` arguments and returns a seqio name for a macro
    (`MIXTURE_OR_TASK_NAME = @superni_mixture()`): the `role` mixture ("test" or "train"), or with `task` (a
    SuperNI task name, e.g. 'task1155_bard_analogical_reasoning_trash_or_treasure') that task alone.

    Raises SuperNISplitError naming the task when it is not registered, or (with downstream_splits) when it has no
    train instances."""
    if role not in ("train", "test"):
        raise superni.SuperNISplitError(f"superni_mixture.role={role!r}: use 'train' or 'test'.")
    reg = register_superni()  # the gin-configurable wrapper above: data_dir etc. come from gin
    if task is None:
        return reg.train_mixture if role == "train" else reg.test_mixture
    name = superni.seqio_task_name(task, reg.prefix)
    if name not in reg.task_data:
        raise superni.SuperNISplitError(
            f"superni_mixture.task={task!r} is not a task of this SuperNI registration ({len(reg.test_tasks)} test / "
            f"{len(reg.train_tasks)} train tasks); check the name against splits/<split_name>/test_tasks.txt.")
    data = reg.task_data[name]
    if data.is_test and reg.selection.downstream_splits and data.num_examples("train") == 0:
        raise superni.SuperNISplitError(
            f"superni_mixture.task={task!r} has no train instances (it has at most {superni.OFFICIAL_TEST_INSTANCES}, "
            "all test): drop it from single-task runs.")
    return name


@gin.configurable
def superni_epoch_steps(num_epochs: float = 2.0, batch_size: int = gin.REQUIRED,
                        mixture_or_task_name: str = gin.REQUIRED, split: str = "train") -> int:
    """Training steps for `num_epochs` passes over the "train" examples of a registered SuperNI task or mixture
    (Tk-Instruct trains for epochs; gin: `TRAIN_STEPS = @superni_epoch_steps()` with `.batch_size = %BATCH_SIZE`
    and `.mixture_or_task_name = %MIXTURE_OR_TASK_NAME`): ceil(num_epochs * examples / batch_size), at least 1.
    A task of a mixture that is not a SuperNI task is an error naming it."""
    data = {}
    for reg_data in superni._REGISTERED_TASK_DATA.values():
        data.update(reg_data)
    tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
    unknown = [t.name for t in tasks if t.name not in data]
    if unknown:
        raise superni.SuperNISplitError(
            f"superni_epoch_steps: {unknown[0]!r} (in {mixture_or_task_name!r}) is not a registered SuperNI task; set "
            "TRAIN_STEPS directly for other tasks.")
    examples = sum(data[t.name].num_examples(split) for t in tasks if split in data[t.name].splits)
    return max(1, math.ceil(num_epochs * examples / batch_size))
