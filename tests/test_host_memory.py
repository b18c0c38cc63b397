"""itjax.host_memory: freed host memory is reused instead of page-faulted back in (each case in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MB block five times; prints the minor page faults of the last four rounds.
_PROBE = """
import json, resource, sys
from itjax import host_memory
applied = host_memory.retain_freed_memory()
import numpy as np
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(16 * 1024 * 1024, np.float32)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[1:])}))
"""


def _probe(switch: str) -> dict:
    env = dict(os.environ, ITJAX_RETAIN_FREED_MEMORY=switch)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    kept, default = _probe("1"), _probe("0")
    assert kept["applied"] and not default["applied"]
    # glibc's default maps and unmaps a 64 MB block each time: its pages fault in again every round.
    assert default["faults"] > 0
    assert kept["faults"] < 0.1 * default["faults"]
