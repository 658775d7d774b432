"""Which storage options carry credentials, and the options without them: what may leave this process.

A credential passed as a storage option stays where it was given (a library caller's process); whatever receives
the rest (a Ray worker) reads its own credentials from its environment. Names only, never values, go into messages.
"""

from __future__ import annotations

from typing import Any

_SECRET_WORDS = ("secret", "password", "token", "credential", "passphrase", "sas")


def is_secret_option(name: str) -> bool:
    """Whether a storage option of this name carries a credential (s3fs ``key``/``secret``/``token``, botocore
    ``aws_*_key*``, Azure ``account_key``/``sas_token``/``connection_string``, ...)."""
    lowered = name.lower()
    return (lowered == "key" or lowered.endswith("_key") or "access_key" in lowered or "connection_string" in lowered
            or any(word in lowered for word in _SECRET_WORDS))


def secret_option_names(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the credential-bearing entries of `options` (nested dicts included); never their values."""
    names = []
    for name, value in options.items():
        if is_secret_option(str(name)):
            names.append(f"{prefix}{name}")
        elif isinstance(value, dict):
            names += secret_option_names(value, f"{prefix}{name}.")
    return names


def shareable_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` without any credential-bearing entry: what may leave this process (a Ray actor's arguments).
    Whoever gets them reads credentials from its own environment (workload identity, AWS_* variables, a
    credentials file)."""
    return {name: shareable_options(value) if isinstance(value, dict) else value
            for name, value in options.items() if not is_secret_option(str(name))}
