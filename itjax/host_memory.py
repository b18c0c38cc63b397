"""Host-memory allocator settings for CPU runs: keep freed memory in the process instead of returning it to the OS.

XLA:CPU allocates every train step's temporaries with `malloc` and frees them when the step ends: for T5 v1.1-small
at batch 8 x (512 + 128) about 4.5 GB per step, in blocks of up to 50 MB. glibc's default allocator hands such
blocks back to the kernel (large blocks are `mmap`ed and unmapped one by one, the heap top is trimmed, and each
thread's arena is a separate mapping), so the next step touches fresh pages again: on this 2-core machine that was
1.16 million minor page faults and 2-3 s of kernel time per T5-small step (of ~8.3 s). `retain_freed_memory()`
tells glibc to serve every block from one heap and never trim it (`mallopt`: M_MMAP_MAX = 0, M_TRIM_THRESHOLD =
-1, M_ARENA_MAX = 1): after the first step no page faults remain and the step takes ~6.9 s
(`python scripts/bench_train_step.py`, see README "Speed"). The price is that the process keeps its peak host
memory until it exits, which a training or evaluation process reaches again on every step anyway.

The CLIs (`itjax.train`, `itjax.eval`, `itjax.infer`) and the benchmarks call it at start-up. Set
`ITJAX_RETAIN_FREED_MEMORY=0` to keep glibc's defaults. Preloading another allocator (e.g.
`LD_PRELOAD=libtcmalloc_minimal.so.4`) has the same effect; where glibc is not the C library this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV_SWITCH = "ITJAX_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Configure glibc malloc to keep freed blocks for reuse (see the module docstring).

    Returns True when the settings were applied; False when switched off by `ITJAX_RETAIN_FREED_MEMORY=0`, when
    the C library is not glibc, or when glibc refused a setting. Call it early: blocks already mapped are
    unaffected, and M_ARENA_MAX applies to threads that have not allocated yet.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # M_TRIM_THRESHOLD -1: never trim the heap top; M_MMAP_MAX 0: no per-block mappings; M_ARENA_MAX 1: one heap.
    results = [mallopt(param, value) for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))]
    return all(result == 1 for result in results)
