"""Can the Ray cluster place one render worker at all? Asked before a job writes or renders anything.

A worker claims ``{"CPU": 1, "GPU": gpus_per_worker}``. Ray Data waits forever for resources no node has (logging
"No available node types can fulfill resource request" every few seconds), so a job that asks for GPUs on a cluster
without any would hang: `check_cluster` refuses it instead. With an autoscaler configured (KubeRay, ``ray up``) whose
node groups could hold the worker, it waits up to ``wait_s`` for such a node to join, then gives up.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from jobs.spec import JobSpec
from pipeline.errors import TokentrimError

logger = logging.getLogger(__name__)

AUTOSCALE_WAIT_S = 600.0  # how long a job waits for an autoscaler to add a node that can hold a worker
_POLL_S = 5.0


class ClusterResourceError(TokentrimError):
    """No node of the cluster (nor any node the autoscaler may add) can place one worker. Exit status 2."""


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What one Ray worker claims (`jobs.executors.RayExecutor`)."""
    gpus = spec.execution.gpus_per_worker
    return {"CPU": 1.0, **({"GPU": float(gpus)} if gpus > 0 else {})}


def fits(need: Mapping[str, float], have: Mapping[str, Any]) -> bool:
    """Whether a node with totals ``have`` can hold a worker claiming ``need``."""
    return all(float(have.get(key, 0.0) or 0.0) >= amount - 1e-9 for key, amount in need.items())


def _connected_or_remote() -> bool:
    import ray

    return bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()


def _alive_totals(ray: Any) -> list[dict[str, float]]:
    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def autoscaler_groups(ray: Any) -> list[dict[str, float]] | None:
    """The resources of each node group an autoscaler may still add (``max_count`` != 0), or None when the cluster
    has no autoscaler config (a fixed cluster, a laptop). Read as Ray Data reads it (`ray._private.state`)."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except (AttributeError, ImportError) as exc:  # a private API: a Ray without it means "no autoscaler known"
        logger.debug("no autoscaler config readable: %s", exc)
        return None
    if config is None:
        return None
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def _describe(totals: list[dict[str, float]], need: Mapping[str, float]) -> str:
    if not totals:
        return "no alive node"
    best = {key: max(float(t.get(key, 0.0)) for t in totals) for key in need}
    return f"{len(totals)} alive node(s), the most any has: " + ", ".join(
        f"{key} {_number(value)}" for key, value in best.items())


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_cluster(spec: JobSpec, *, wait_s: float = AUTOSCALE_WAIT_S, ray: Any = None,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise `ClusterResourceError` (one line naming what is missing) unless an alive node of the connected Ray
    cluster can hold one worker of ``spec`` (`worker_resources`); a local executor needs no check. With an autoscaler
    whose node groups could hold one, wait up to ``wait_s`` seconds for such a node (logged), then give up."""
    need = worker_resources(spec)
    if spec.execution.executor != "ray" or (ray is None and not _connected_or_remote() and "GPU" not in need):
        return  # a local Ray started for this job has this machine's CPUs: a CPU worker always fits
    if ray is None:
        from jobs.executors import connect_ray

        ray = connect_ray()
    totals = _alive_totals(ray)
    if any(fits(need, t) for t in totals):
        return
    wanted = "{" + ", ".join(f"{k}: {_number(v)}" for k, v in need.items()) + "}"
    groups = autoscaler_groups(ray)
    if not groups or not any(fits(need, g) for g in groups):
        scaler = "" if groups is None else "; no node group of its autoscaler has them either"
        raise ClusterResourceError(
            f"the Ray cluster cannot place a worker needing {wanted} ({_describe(totals, need)}{scaler}): "
            f"lower --gpus-per-worker or add nodes with {'GPUs' if 'GPU' in need else 'CPUs'}")
    logger.warning("no alive node can place a worker needing %s; waiting up to %.0f s for the autoscaler to add one",
                   wanted, wait_s)
    deadline = clock() + wait_s
    while clock() < deadline:
        sleep(min(_POLL_S, max(deadline - clock(), 0.0)))
        totals = _alive_totals(ray)
        if any(fits(need, t) for t in totals):
            return
    raise ClusterResourceError(
        f"the Ray cluster cannot place a worker needing {wanted}: waited {_number(math.ceil(wait_s))} s for the "
        f"autoscaler to add a node that can ({_describe(totals, need)})")
