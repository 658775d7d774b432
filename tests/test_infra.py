"""infra/: the manifests parse and their tokentrim command lines are accepted by the CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import yaml
from click.testing import CliRunner

from jobs.cli import main

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _parse_only(argv: list[str]) -> None:
    """Parse ``tokentrim [-v] COMMAND ARGS`` with click without running the command (bad options raise)."""
    args = [a for a in argv if a not in ("-v", "-vv")]
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"no command {args[0]!r}"
    command.make_context(args[0], args[1:])


def test_rayjob_entrypoint_is_a_valid_tokentrim_command():
    doc = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "tokentrim"
    _parse_only(argv[1:])
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
    assert int(gpus) == float(argv[argv.index("--gpus-per-worker") + 1])
    assert workers["replicas"] == int(argv[argv.index("--workers") + 1])


def test_nightly_regression_entrypoint_is_a_valid_tokentrim_command():
    docs = list(yaml.safe_load_all((INFRA / "nightly-cronjob.yaml").read_text()))
    assert docs[0]["kind"] == "CronJob"
    rayjob = yaml.safe_load(docs[1]["data"]["regress-rayjob.yaml"])
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["tokentrim", "regress"]
    _parse_only(argv[1:])


def test_raycluster_has_a_gpu_worker_group():
    doc = yaml.safe_load((INFRA / "raycluster.yaml").read_text())
    assert doc["kind"] == "RayCluster"
    group = doc["spec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_installs_the_three_packages():
    text = (INFRA / "Dockerfile").read_text()
    for package in ("tokentrim", "pipeline", "jobs"):
        assert f"COPY {package} ./{package}" in text
    assert 'ENTRYPOINT ["tokentrim"]' in text


def test_cli_help_lists_every_command():
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("render", "submit", "resume", "status", "regress", "demo"):
        assert command in out
