"""Executors only dispatch: they hand rows to `jobs.policy.process_row` and return one work row per prompt.

`LocalExecutor` runs rows one after another in this process (no Ray: tests and small runs). `RayExecutor` runs them
on a Ray Data actor pool, one row per task, each actor holding one model. Neither decides anything about a prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from jobs.layout import JobOutput
from jobs.policy import WORK_FIELDS, Claims, process_row
from jobs.spec import JobSpec, ModelChoice
from jobs.table import PromptRow
from pipeline.errors import TokentrimError
from pipeline.storage_options import secret_option_names, shareable_options

if TYPE_CHECKING:
    from pipeline.model.backend import WanBackend

logger = logging.getLogger(__name__)

TEMP_PREFIX = "tokentrim-worker-"
# Test hook: a worker resolves its card as usual ("cuda:N", recorded) but loads the model on the CPU, so that GPU
# pinning is tested on a machine that only declares GPUs to Ray (tests/test_gpu_workers.py).
CUDA_AS_CPU_ENV = "TOKENTRIM_TEST_CUDA_AS_CPU"


class Executor(Protocol):
    def run(self, rows: list[PromptRow]) -> Iterable[dict[str, Any]]:
        """One work row (`jobs.policy.WORK_FIELDS`) per input row, in any order, as each row finishes."""
        ...


def load_model(model: ModelChoice, device: str) -> WanBackend:
    """The backend of ``model`` on ``device`` (`ModelChoice.resolve_device`)."""
    import torch

    from pipeline.model.backend import load_backend

    if device.startswith("cuda") and os.environ.get(CUDA_AS_CPU_ENV) == "1":
        device = "cpu"
    return load_backend(model.model, device=device, dtype=getattr(torch, model.dtype), weights=model.weights,
                        compile=model.compile)


def worker_device(spec: JobSpec, gpu_ids: list[Any], visible: str | None) -> str:
    """The device of a Ray worker that was given the cards ``gpu_ids`` (`ray.get_gpu_ids()`): plain ``cuda`` (the
    default with --gpus-per-worker) becomes the worker's own first card, as torch numbers it under
    CUDA_VISIBLE_DEVICES (``visible``, which Ray sets to the worker's cards); an explicit ``cuda:N`` or ``cpu`` is
    kept."""
    device = spec.resolved_device
    if device != "cuda" or not gpu_ids:
        return device
    card = str(gpu_ids[0])
    if visible is None:
        return f"cuda:{card}"
    order = [v.strip() for v in visible.split(",") if v.strip()]
    return f"cuda:{order.index(card)}" if card in order else "cuda"


def worker_tempdir(root: str | None = None) -> str:
    """A temp folder private to this process; first removes the folders of dead workers on this host, and what
    they left there (a killed worker's half-written mp4)."""
    root = root or tempfile.gettempdir()
    host = socket.gethostname()
    for name in os.listdir(root):
        pid = name[len(f"{TEMP_PREFIX}{host}-"):]
        if name.startswith(f"{TEMP_PREFIX}{host}-") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    path = os.path.join(root, f"{TEMP_PREFIX}{host}-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def private_tempdir() -> Iterator[str]:
    """Temporary files of this block (the mp4 encoder's) go to `worker_tempdir()`, removed afterwards."""
    path, old = worker_tempdir(), tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield path
    finally:
        tempfile.tempdir = old
        shutil.rmtree(path, ignore_errors=True)


class LocalExecutor:
    """Serial, in this process: the model is loaded once, on the first row that needs it."""

    def __init__(self, spec: JobSpec, out: JobOutput, *, force: bool = False) -> None:
        self.spec, self.force = spec, force
        self.claims = Claims(out, lease_s=spec.execution.lease_s, max_attempts=spec.execution.max_attempts)
        self.backend: WanBackend | None = None

    def run(self, rows: list[PromptRow]) -> Iterator[dict[str, Any]]:
        if not rows:
            return
        if self.backend is None:
            self.backend = load_model(self.spec.model, self.spec.resolved_device)
        backend = self.backend
        with private_tempdir():
            for row in rows:
                yield process_row(backend, self.spec, row, self.claims, force=self.force)


class RenderWorker:
    """Ray Data actor: loads the model once, then renders each batch (one prompt row) into one work row."""

    loads_in_process: ClassVar[int] = 0  # models this process's workers loaded (an actor has a process of its own)

    def __init__(self, spec: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 force: bool = False) -> None:
        import ray

        self.spec = JobSpec.from_dict(spec, storage_options)
        self.force = force
        tempfile.tempdir = worker_tempdir()  # this actor process's own; a dead actor's is removed by the next one
        gpu_ids, visible = list(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES")
        device = worker_device(self.spec, gpu_ids, visible)
        self.backend = load_model(self.spec.model, device)
        RenderWorker.loads_in_process += 1
        out = JobOutput.open(self.spec.output_url, self.spec.storage_options)  # this process's own connections
        self.claims = Claims(out, lease_s=self.spec.execution.lease_s, max_attempts=self.spec.execution.max_attempts)
        self.record: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "gpu_ids": [str(i) for i in gpu_ids],
            "cuda_visible_devices": visible, "device": device, "torch_device": str(self.backend.device),
            "model_loads": RenderWorker.loads_in_process, "prompt_ids": []}
        self.record_key, self.out = out.worker_key(f"{self.record['host']}-{os.getpid()}"), out
        self._write_record()

    def _write_record(self) -> None:
        """Which cards this worker holds and which rows it rendered (`workers/` under the job); bookkeeping only: a
        store error here is logged, never the row's failure."""
        try:
            self.out.store.put_json(self.record_key, self.record)
        except TokentrimError as exc:
            logger.warning("could not write %s: %s", self.record_key, exc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """``batch``: columns of PromptRow fields -> columns of work fields."""
        n = len(batch["prompt_id"])
        rows = [PromptRow(**{f.name: _plain(batch[f.name][i]) for f in dataclasses.fields(PromptRow)})
                for i in range(n)]
        results = [process_row(self.backend, self.spec, row, self.claims, force=self.force) for row in rows]
        self.record["prompt_ids"] += [row.prompt_id for row in rows]
        self._write_record()
        return {name: [r[name] for r in results] for name in WORK_FIELDS}


def _plain(value: Any) -> Any:
    """numpy scalars from Ray Data batches -> Python values."""
    return value.item() if hasattr(value, "item") else value


class RayExecutor:
    """Ray Data: one row per block and task, an actor pool of `RenderWorker` (``gpus_per_worker`` each).

    No Ray retry caps: a task lost with its node is retried by Ray without limit, and the claims bound the attempts
    a prompt gets. Each actor runs one task at a time, so no row waits behind a long rollout on a busy actor.
    """

    def __init__(self, spec: JobSpec, *, force: bool = False) -> None:
        self.spec, self.force = spec, force

    def run(self, rows: list[PromptRow]) -> Iterator[dict[str, Any]]:
        if not rows:
            return
        ray = connect_ray()
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.verbose_progress = False
        # the driver's own bar (`jobs.progress`) shows what the job commits; Ray Data's bars only with -v
        ctx.enable_progress_bars = logger.isEnabledFor(logging.INFO)
        # one row is a whole long rollout: do not let Ray Data call that "no progress" after its default 30 min
        ctx.execution_no_progress_timeout_s = max(ctx.execution_no_progress_timeout_s, 6 * 3600.0)
        ds = ray.data.from_items([r.to_dict() for r in rows], override_num_blocks=len(rows))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                RenderWorker,
                fn_constructor_kwargs=self.worker_kwargs(),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(self.spec.execution.workers, len(rows)),
                                                   max_tasks_in_flight_per_actor=1),
                num_gpus=self.spec.execution.gpus_per_worker or None,
                num_cpus=1,
            )
        for row in ds.iter_rows():  # streamed: each row as its task finishes
            yield {name: row.get(name) for name in WORK_FIELDS}

    def worker_kwargs(self) -> dict[str, Any]:
        """`RenderWorker`'s constructor arguments: Ray shows and stores them, so they carry no credential. Workers
        read theirs from their own environment (workload identity, AWS_* variables, a credentials file)."""
        dropped = secret_option_names(self.spec.storage_options)
        if dropped:
            logger.warning("storage options %s stay in this process: Ray workers read their credentials from their "
                           "own environment", ", ".join(dropped))
        return {"spec": self.spec.to_dict(), "storage_options": shareable_options(self.spec.storage_options),
                "force": self.force}


def connect_ray() -> Any:
    """The ray module, connected: to RAY_ADDRESS when set, else a local cluster (unless already connected)."""
    ray = _import_ray()
    verbose = logger.isEnabledFor(logging.INFO)  # `tokentrim -v`: Ray's own INFO lines and worker logs too
    if not ray.is_initialized():  # honours RAY_ADDRESS; a local cluster otherwise
        ray.init(logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose)
    if not verbose:
        importlib.import_module("ray.data")  # Ray Data sets up its own loggers on import: quiet them after that

        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its "progress bars disabled": ours is the bar
    return ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency; the message names the fix
        raise ImportError("tokentrim jobs need Ray: pip install 'ray[data,default]'") from exc
    return ray


def make_executor(spec: JobSpec, out: JobOutput, *, force: bool = False) -> Executor:
    """The executor of ``spec``; a local one renders to ``out``, Ray workers open the output in their own process."""
    local = spec.execution.executor == "local"
    return LocalExecutor(spec, out, force=force) if local else RayExecutor(spec, force=force)
