"""The layout of a job's output: every key a job writes under its URL, named and parsed here and nowhere else.

`JobOutput` wraps the job's `Store`; it is built once where a command starts (`JobOutput.open`) and passed down.
A prompt's latent context is a store of its own, `rollout(id)` (``rollouts/<id>/``), which `pipeline` writes
without knowing where it sits.
"""

from __future__ import annotations

from typing import Any

from pipeline.store import Store

JOB_KEY = "job.json"  # the spec, its config hash, the format and version
RESULTS_KEY = "results.parquet"  # one row per table row (`jobs.results`)
INDEX_KEY = "done_index.parquet"  # a cache of the done markers (`jobs.done_index`)
PAGE_KEY = "report.html"  # `tokentrim report`'s page
VIDEO_KEY, STATS_KEY = "videos/{id}.mp4", "stats/{id}.parquet"  # `pipeline.outputs.render`'s ``names``
DONE_PREFIX, DONE_SUFFIX = "done/", ".json"
CLAIMS_PREFIX, ROLLOUTS_PREFIX, WORKERS_PREFIX = "claims/", "rollouts/", "workers/"


class JobOutput:
    """A job output: its store and the keys of what a job keeps there.

    ``job.json``, ``results.parquet``, ``done_index.parquet``, ``report.html``; per prompt id ``videos/<id>.mp4``,
    ``stats/<id>.parquet``, ``done/<id>.json``, ``claims/<id>/<n>.json`` and ``<n>.lease`` (`jobs.policy`),
    ``rollouts/<id>/`` (latent-context checkpoints); ``workers/<host>-<pid>.json`` per Ray worker.
    """

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"`store` must be a Store, got {type(store).__name__}")
        self.store = store

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> JobOutput:
        return cls(Store(url, storage_options))

    @property
    def url(self) -> str:
        return self.store.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store.url!r})"

    def variant(self, name: str) -> JobOutput:
        """The job output in folder ``name`` under this one (a regression's variants)."""
        return JobOutput(self.store.child(name))

    # -- per prompt -----------------------------------------------------------------------------
    @staticmethod
    def video_key(prompt_id: str) -> str:
        return VIDEO_KEY.format(id=prompt_id)

    @staticmethod
    def stats_key(prompt_id: str) -> str:
        return STATS_KEY.format(id=prompt_id)

    @staticmethod
    def done_key(prompt_id: str) -> str:
        return f"{DONE_PREFIX}{prompt_id}{DONE_SUFFIX}"

    @staticmethod
    def done_id(key: str) -> str | None:
        """The prompt id of a done marker's key (None: not one)."""
        if key.startswith(DONE_PREFIX) and key.endswith(DONE_SUFFIX) and len(key) > len(DONE_PREFIX + DONE_SUFFIX):
            name = key[len(DONE_PREFIX):-len(DONE_SUFFIX)]
            return None if "/" in name else name
        return None

    @staticmethod
    def claim_key(prompt_id: str, attempt: int) -> str:
        return f"{CLAIMS_PREFIX}{prompt_id}/{attempt}.json"

    @staticmethod
    def lease_key(prompt_id: str, attempt: int) -> str:
        return f"{CLAIMS_PREFIX}{prompt_id}/{attempt}.lease"

    @staticmethod
    def worker_key(name: str) -> str:
        return f"{WORKERS_PREFIX}{name}.json"

    def rollout(self, prompt_id: str) -> Store:
        """The store of a prompt's latent-context checkpoints (``rollouts/<id>/``)."""
        return self.store.child(f"{ROLLOUTS_PREFIX}{prompt_id}")

    # -- listings -------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """The prompts with a done marker now (a fresh listing)."""
        return {pid for key in self.store.list(DONE_PREFIX) if (pid := self.done_id(key)) is not None}

    def attempts(self, prompt_id: str) -> list[int]:
        """The attempt numbers claimed on a prompt, ascending."""
        prefix = f"{CLAIMS_PREFIX}{prompt_id}/"
        names = (k[len(prefix):-len(".json")] for k in self.store.list(prefix) if k.endswith(".json"))
        return sorted(int(n) for n in names if n.isdigit())

    def claimed_ids(self) -> set[str]:
        """The prompts with any claim."""
        return {key.split("/")[1] for key in self.store.list(CLAIMS_PREFIX)}

    def chunk_markers(self) -> list[tuple[str, int, str]]:
        """(prompt id, chunk index, key) of every checkpoint chunk marker under ``rollouts/`` (a fresh listing)."""
        from pipeline.outputs.checkpoint import marker_index

        found = []
        for key in self.store.list(ROLLOUTS_PREFIX):
            pid, _, name = key[len(ROLLOUTS_PREFIX):].partition("/")
            index = marker_index(name)
            if pid and index is not None:
                found.append((pid, index, key))
        return found


__all__ = ["INDEX_KEY", "JOB_KEY", "JobOutput", "PAGE_KEY", "RESULTS_KEY"]
