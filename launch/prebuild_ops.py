"""Build DeepSpeed's C++ ops that training on this machine loads, once, at `make setup` (not at a run's start).

    DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=.venv/torch_extensions python launch/prebuild_ops.py

DeepSpeed compiles an op with the venv's torch the first time a process loads it (JIT, into
TORCH_EXTENSIONS_DIR): on CPU, `deepspeed.init_distributed` loads the shared-memory communication op and
`deepspeed.offload_optimizer` DeepSpeed's CPU Adam. Each takes 30-80 s on 2 cores; built here, a first `make
train` and the test suite load them in a second. The ops build in parallel, one process each, since ninja's
lock makes a second process wait for a build in progress rather than start its own.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")  # deepspeed_shm_comm, cpu_adam


def build(name: str) -> str:
    from deepspeed.accelerator import get_accelerator

    tic = time.perf_counter()
    builder = get_accelerator().create_op_builder(name)
    if builder is None:
        return f"{name}: not built by this accelerator"
    builder.load(verbose=False)
    return f"{builder.NAME}: ready in {time.perf_counter() - tic:.0f} s"


def main() -> None:
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        sys.exit("launch/prebuild_ops.py builds the CPU ops: set DS_ACCELERATOR=cpu")
    with ProcessPoolExecutor(len(OPS)) as pool:
        for line in pool.map(build, OPS):
            print(f"deepspeed op {line}", flush=True)


if __name__ == "__main__":
    main()
