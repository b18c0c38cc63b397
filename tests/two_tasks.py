"""Flags that train on two of the quickstart's 14 tasks, mixed with gin's `@mixture()` (shared by the tests whose
short runs are not about the mixture: building all 14 tasks' train and evaluation pipelines would be most of a
2-3 step run). The mixture sampler's state is part of what a resumed run must restore, and a run built this way
also checks that its config.gin reads the mixture back (`itjax.runs.load`, `itjax.convert --from_run`)."""

TWO_TASKS = ["--gin.MIXTURE_OR_TASK_NAME=@mixture()", "--gin.mixture.name='quickstart_two'",
             "--gin.mixture.tasks=['quickstart_copy_words', ('quickstart_reverse_words', 2.0)]"]
