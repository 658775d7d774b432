"""infra/: every manifest against a compact schema of the KubeRay / Kubernetes fields it uses, the deployment rules
of issue 9 item 12, the nightly submitter's behaviour (with a fake kubectl), and the command lines against the CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from jobs.cli import main
from tests.kuberay_schema import check

INFRA = Path(__file__).resolve().parents[1] / "infra"
S3_SECRET = "tokentrim-s3"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def _nightly() -> dict[str, Any]:
    """The CronJob file's objects by kind, plus the RayJob template from its ConfigMap."""
    docs = {d["kind"]: d for d in _docs("nightly-cronjob.yaml")}
    docs["RayJob"] = yaml.safe_load(docs["ConfigMap"]["data"]["regress-rayjob.yaml"])
    return docs


def _all_manifests() -> list[tuple[str, dict]]:
    found = [(f"{name}[{i}]", d) for name in ("raycluster.yaml", "rayjob.yaml", "nightly-cronjob.yaml")
             for i, d in enumerate(_docs(name))]
    return [*found, ("nightly-cronjob.yaml:regress-rayjob.yaml", _nightly()["RayJob"])]


def _cluster_specs() -> list[tuple[str, dict, dict]]:
    """(where, the object's metadata, RayClusterSpec) of every Ray cluster the manifests create."""
    out = [("raycluster.yaml", _docs("raycluster.yaml")[0]["metadata"], _docs("raycluster.yaml")[0]["spec"])]
    for where, job in (("rayjob.yaml", _docs("rayjob.yaml")[0]), ("nightly RayJob", _nightly()["RayJob"])):
        out.append((where, job["metadata"], job["spec"]["rayClusterSpec"]))
    return out


def _containers(cluster: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


# ------------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("where,doc", _all_manifests(), ids=[w for w, _ in _all_manifests()])
def test_every_manifest_uses_only_known_fields_with_the_right_types(where, doc):
    assert check(doc) == [], where


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["spec"].__setitem__("ttlSecondAfterFinished", 60), "unknown field 'ttlSecondAfterFinished'"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "8"), "expected int"),
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", "true"), "expected bool"),
    (lambda d: d["spec"].__setitem__("submissionMode", "K8sJob"), "is not one of"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__("rayStartParams", {"num-cpus": 0}),
     "expected str"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["resources"]["requests"].__setitem__("memory", "64 GB"), "does not match"),
    (lambda d: d["metadata"].__setitem__("generateName", "x-"), "exactly one of name and generateName"),
    (lambda d: d["spec"].pop("entrypoint"), "missing required field 'entrypoint'"),
])
def test_the_schema_check_rejects_what_the_api_server_would(mutate, expected):
    doc = _docs("rayjob.yaml")[0]
    assert check(doc) == []
    mutate(doc)
    errors = check(doc)
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------------------------------ cluster rules
@pytest.mark.parametrize("where,meta,cluster", _cluster_specs(), ids=[w for w, _, _ in _cluster_specs()])
def test_every_ray_container_gets_the_s3_credentials_and_requests_resources(where, meta, cluster):
    for group, container in _containers(cluster):
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert S3_SECRET in secrets, (where, group)  # the head runs the driver: it reads and writes S3 too
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), (where, group)
        if group != "head":
            assert requests.get("nvidia.com/gpu") == container["resources"]["limits"]["nvidia.com/gpu"], where


@pytest.mark.parametrize("where,meta,cluster", _cluster_specs(), ids=[w for w, _, _ in _cluster_specs()])
def test_a_custom_container_command_comes_with_the_overwrite_annotation(where, meta, cluster):
    for group, container in _containers(cluster):
        command = " ".join(container.get("command", []) + container.get("args", []))
        if "KUBERAY_GEN_RAY_START_CMD" in command:
            assert meta.get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true", (where, group)
        else:
            assert "command" not in container and "args" not in container, (where, group)


def test_the_image_pins_the_ray_version_the_manifests_name():
    dockerfile = (INFRA / "Dockerfile").read_text()
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert pinned, "infra/Dockerfile: no ARG RAY_VERSION"
    assert '"ray[data,default]==${RAY_VERSION}"' in dockerfile
    assert {c["rayVersion"] for _, _, c in _cluster_specs()} == {pinned.group(1)}
    assert "wget" in dockerfile  # KubeRay's probes exec wget in the Ray containers


def test_dockerfile_installs_the_three_packages():
    text = (INFRA / "Dockerfile").read_text()
    for package in ("tokentrim", "pipeline", "jobs"):
        assert f"COPY {package} ./{package}" in text
    assert 'ENTRYPOINT ["tokentrim"]' in text


# ------------------------------------------------------------------------------------------------ nightly
def test_the_nightly_cronjob_cannot_overlap_and_cleans_up():
    docs = _nightly()
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["ttlSecondsAfterFinished"] > 0
    rayjob = docs["RayJob"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["ttlSecondsAfterFinished"] > 0
    # a fresh RayJob per run (a finished RayJob is never rerun), found again by the label submit.sh selects on
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")
    label = re.search(r"selector=(\S+)=(\S+)", docs["ConfigMap"]["data"]["submit.sh"])
    assert label and rayjob["metadata"]["labels"] == {label.group(1): label.group(2)}
    # the submitter waits out the RayJob's own deadline: WAIT_S > the RayJob's activeDeadlineSeconds
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    assert rayjob["spec"]["activeDeadlineSeconds"] < int(env["WAIT_S"]) < job["activeDeadlineSeconds"]


def test_the_nightly_submitter_has_an_account_allowed_what_it_does():
    docs = _nightly()
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    binding = docs["RoleBinding"]
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": docs["Role"]["metadata"]["name"]}
    allowed = {(g, r, v) for rule in docs["Role"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    script = docs["ConfigMap"]["data"]["submit.sh"]
    # what submit.sh runs: list the nightly RayJobs, create tonight's, read its status
    calls = {"list": "kubectl get rayjobs -l", "create": "kubectl create -f -", "get": 'kubectl get rayjob "$name"'}
    for verb, call in calls.items():
        assert call in script, call
        assert ("ray.io", "rayjobs", verb) in allowed, verb
    volume = next(v for v in pod["volumes"] if v["name"] == "nightly")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]


# a fake kubectl: lists the RayJobs in FAKE_KUBECTL (JSON), creates one, then reports the statuses one per call
FAKE_KUBECTL = """#!{python}
import json, os, sys
state_path = os.environ["FAKE_KUBECTL"]
state = json.load(open(state_path))
args = sys.argv[1:]
state["calls"].append(args)
if args[:2] == ["get", "rayjobs"]:
    if state["existing"] == "ERROR":
        sys.exit(1)
    print("".join(f"{{n}} {{s}}\\n" for n, s in state["existing"]), end="")
elif args[0] == "create":
    state["created"] = sys.stdin.read()
    print("tokentrim-nightly-x7k2p", end="")
elif args[:2] == ["get", "rayjob"]:
    status = state["statuses"].pop(0) if len(state["statuses"]) > 1 else state["statuses"][0]
    json.dump(state, open(state_path, "w"))
    if status == "ERROR":
        sys.exit(1)
    print(status, end="")
json.dump(state, open(state_path, "w"))
"""


def _run_submitter(tmp_path: Path, existing: list, statuses: list[str], **env: str) -> tuple[int, dict, str]:
    """Run the ConfigMap's submit.sh with the fake kubectl first on PATH: (exit code, fake state, output)."""
    data = _nightly()["ConfigMap"]["data"]
    (tmp_path / "bin").mkdir()
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "submit.sh").write_text(data["submit.sh"])
    (tmp_path / "rayjob.yaml").write_text(data["regress-rayjob.yaml"])
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"existing": existing, "statuses": statuses, "calls": []}))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_KUBECTL": str(state),
           "RAYJOB_MANIFEST": str(tmp_path / "rayjob.yaml"), "POLL_S": "0", "WAIT_S": "30", **env}
    done = subprocess.run(["/bin/sh", str(tmp_path / "submit.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, json.loads(state.read_text()), done.stdout + done.stderr


@pytest.mark.parametrize("statuses,code", [
    (["", "PENDING Initializing", "RUNNING Running", "SUCCEEDED Complete"], 0),
    (["RUNNING Running", "FAILED Complete"], 1),  # the Ray job failed: a regression, or a crash
    (["RUNNING Running", "FAILED Failed"], 1),
    (["PENDING Initializing", " Failed"], 1),  # the cluster never came up
    (["RUNNING Running", "STOPPED Complete"], 1),
    (["ERROR", "RUNNING Running", "SUCCEEDED Complete"], 0),  # one failed kubectl call is not the outcome
])
def test_the_submitter_waits_for_the_rayjob_and_exits_with_its_outcome(tmp_path, statuses, code):
    rc, state, output = _run_submitter(tmp_path, [["tokentrim-nightly-old", "Complete"]], statuses)
    assert rc == code, output
    created = yaml.safe_load(state["created"])
    assert created["metadata"]["generateName"] == "tokentrim-nightly-"
    assert re.search(r"--out s3://\S+/nightly/\d{4}-\d{2}-\d{2} ", created["spec"]["entrypoint"])
    polls = [c for c in state["calls"] if c[:3] == ["get", "rayjob", "tokentrim-nightly-x7k2p"]]
    assert len(polls) == len(statuses)  # it polled until the terminal status, not once


@pytest.mark.parametrize("other", ["Running", "", "Initializing"])  # "": just created, no status yet
def test_the_submitter_refuses_to_start_while_a_nightly_rayjob_is_unfinished(tmp_path, other):
    existing = [["tokentrim-nightly-a", "Complete"], ["tokentrim-nightly-c", "Failed"], ["tokentrim-nightly-b", other]]
    rc, state, output = _run_submitter(tmp_path, existing, ["SUCCEEDED Complete"])
    assert rc == 3 and "tokentrim-nightly-b" in output and "nightly-a" not in output and "nightly-c" not in output
    assert "created" not in state and all(c[0] != "create" for c in state["calls"])


def test_the_submitter_fails_when_it_cannot_list_the_rayjobs(tmp_path):
    rc, state, _ = _run_submitter(tmp_path, "ERROR", ["SUCCEEDED Complete"])
    assert rc != 0 and "created" not in state


def test_the_submitter_gives_up_at_its_deadline(tmp_path):
    rc, state, output = _run_submitter(tmp_path, [], ["RUNNING Running"], WAIT_S="1", POLL_S="1")
    assert rc == 1 and "still 'RUNNING' after 1s" in output


# ------------------------------------------------------------------------------------------- command lines
def _parse_only(argv: list[str]) -> click.Context:
    """Parse ``tokentrim [-v] COMMAND ARGS`` with click without running the command (bad options raise)."""
    args = [a for a in argv if a not in ("-v", "-vv")]
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"no command {args[0]!r}"
    return command.make_context(args[0], args[1:])


def _workers_match(argv: list[str], cluster: dict) -> None:
    workers = cluster["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
    assert int(gpus) == float(argv[argv.index("--gpus-per-worker") + 1])
    assert workers["replicas"] == int(argv[argv.index("--workers") + 1])


def test_rayjob_entrypoint_is_a_valid_tokentrim_command():
    doc = _docs("rayjob.yaml")[0]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "tokentrim"
    ctx = _parse_only(argv[1:])
    assert ctx.params["job__dtype"] == "bfloat16" and ctx.params["job__weights"]
    _workers_match(argv, doc["spec"]["rayClusterSpec"])


def test_nightly_regression_entrypoint_renders_on_the_gpus_it_requests():
    rayjob = _nightly()["RayJob"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["tokentrim", "-v", "regress"]
    ctx = _parse_only(argv[1:])
    assert ctx.params["job__dtype"] == "bfloat16" and ctx.params["job__weights"]
    assert ctx.params["rollout__mode"] == "self-forcing"
    _workers_match(argv, rayjob["spec"]["rayClusterSpec"])


def test_cli_help_lists_every_command():
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("render", "submit", "resume", "status", "regress", "demo"):
        assert command in out
