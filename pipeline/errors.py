"""The project's exception hierarchy.

`jobs/` decides between retrying and recording a failure by class: a `TransientError` may succeed on
retry (a flaky store, a lost worker); every other `TokentrimError` is final for the prompt it hit.
"""

from __future__ import annotations


class TokentrimError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(TokentrimError, ValueError):
    """A prompt row, argument or file is malformed. Final: retrying gives the same answer."""


class UsageError(InputError):
    """A bad option or argument of a command (an unknown model, an output holding another job): the CLI exits 2."""


class UnsupportedURLError(UsageError):
    """A URL names a storage protocol this project does not accept (only the tested ones are)."""


class TransientError(TokentrimError):
    """Something that may succeed if tried again (network, store, preempted worker)."""


class StoreError(TokentrimError):
    """A storage operation failed for good (after retries, or for a reason retries cannot fix)."""


class TransientStoreError(StoreError, TransientError):
    """A storage call failed in a way that a retry may fix."""


class CorruptStateError(StoreError):
    """A stored object does not match the size or hash its manifest names."""


class ConfigMismatchError(TokentrimError):
    """Stored rollout state was written under another config hash."""


class OutputConflictError(ConfigMismatchError, UsageError):
    """A job output already holds a job with other render settings (a usage error: exit 2)."""


class LeaseLostError(TransientError):
    """This worker's claim on a prompt is no longer the current one (its lease ran out or a newer attempt exists):
    it must not commit anything more for that prompt."""


class NonFiniteLatentError(TokentrimError):
    """The model produced NaN or Inf latents; the rollout cannot go on."""


class WeightsError(TokentrimError):
    """A checkpoint is missing keys, has unexpected keys, or has the wrong shapes."""
