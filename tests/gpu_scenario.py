"""Render jobs on a local Ray that declares two GPUs on this CPU machine (``ray.init(num_gpus=2)``).

Run in a process of its own (``python -m tests.gpu_scenario TABLE OUT_ROOT``) with ``RAY_TMPDIR`` pointing to a
private folder: it starts the cluster, then runs ``tokentrim submit`` twice through the CLI, ``--gpus-per-worker 1``
into ``OUT_ROOT/one`` and ``--gpus-per-worker 0.5`` into ``OUT_ROOT/half`` (two workers each), and exits with the
first non-zero exit status. Workers load the model on the CPU (`jobs.executors.CUDA_AS_CPU_ENV`, set here before
the cluster starts so that every worker inherits it) and record their card under ``workers/``.
"""

from __future__ import annotations

import logging
import os
import sys


def main(table: str, out_root: str) -> int:
    import ray

    from jobs.cli import main as cli
    from jobs.executors import CUDA_AS_CPU_ENV

    os.environ[CUDA_AS_CPU_ENV] = "1"
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=False, _temp_dir=os.environ["RAY_TMPDIR"])
    try:
        for name, gpus in (("one", "1"), ("half", "0.5")):
            try:
                cli(["submit", table, "--out", os.path.join(out_root, name), "--gpus-per-worker", gpus,
                     "--workers", "2", "--num-chunks", "1", "--allow-any-prompt"], standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    return int(exc.code)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
