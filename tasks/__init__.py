"""SeqIO Task and Mixture registrations; `import itjax.tasks` registers the built-in ones.

quickstart: the built-in synthetic SuperNI instruction tasks (`quickstart_*` Tasks, `quickstart` Mixture).
superni: Super-NaturalInstructions tasks from a natural-instructions checkout (`register_superni`).
flan: FLAN-style template tasks and variants (`register_flan_templates`) and the FLAN 2022 mixture
    (`register_flan2022_mixture`).
p3: P3 / T0 tasks from promptsource templates, with rank-classification evals (`register_p3`).
chat: Alpaca / Dolly and multi-turn (ShareGPT, messages) conversation tasks (`register_chat_task`).
bbh, mmlu: the held-out benchmarks BIG-Bench Hard (`register_bbh`) and MMLU (`register_mmlu`) from local copies.
Only quickstart registers on import; the others register what a user points them at. bbh and mmlu hold gin
configurables, so they are imported where gin is parsed (`--gin_bindings="import itjax.tasks.bbh"`), not here:
`import itjax.tasks` also happens after gin has locked its configuration (itjax.data.pipeline imports it lazily).
"""

from . import chat, flan, p3, quickstart, superni  # noqa: F401  (quickstart registers on import)
