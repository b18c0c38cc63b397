"""SeqIO Task and Mixture registrations; `import itjax.tasks` registers all of them.

quickstart: the built-in synthetic SuperNI instruction tasks (`quickstart_*` Tasks, `quickstart` Mixture).
"""

from . import quickstart  # noqa: F401  (registers on import)
