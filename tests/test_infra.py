"""infra/: every manifest against a compact schema of the KubeRay / Kubernetes fields it uses, the deployment and
security rules (token auth, NetworkPolicy, workload identity and a scoped S3 policy, restricted pods, images pinned
by digest through render.sh), the nightly submitter's behaviour (with a fake kubectl), and the command lines against
the CLI."""

from __future__ import annotations

import fnmatch
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

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
S3_SECRET = "tokentrim-s3"
AUTH_SECRET = "tokentrim-ray-auth"
RAY_ACCOUNT = "tokentrim-ray"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "nightly-cronjob.yaml", "serviceaccount.yaml", "networkpolicy.yaml",
             "models-pvc.yaml")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def _nightly() -> dict[str, Any]:
    """The CronJob file's objects by kind, plus the RayJob template from its ConfigMap."""
    docs = {d["kind"]: d for d in _docs("nightly-cronjob.yaml")}
    docs["RayJob"] = yaml.safe_load(docs["ConfigMap"]["data"]["regress-rayjob.yaml"])
    return docs


def _all_manifests() -> list[tuple[str, dict]]:
    found = [(f"{name}[{i}]", d) for name in MANIFESTS for i, d in enumerate(_docs(name))]
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


def _ray_pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every Ray node and every RayJob submitter the manifests create."""
    out = []
    for where, _, cluster in _cluster_specs():
        out.append((f"{where} head", cluster["headGroupSpec"]["template"]))
        out += [(f"{where} {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    for where, job in (("rayjob.yaml", _docs("rayjob.yaml")[0]), ("nightly RayJob", _nightly()["RayJob"])):
        out.append((f"{where} submitter", job["spec"]["submitterPodTemplate"]))
    return out


def _all_pod_specs() -> list[tuple[str, dict]]:
    cron = _nightly()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return [*((w, t["spec"]) for w, t in _ray_pod_templates()), ("nightly CronJob", cron)]


def _infra_text() -> dict[str, str]:
    """Every file of infra/ plus the image's build inputs, by name."""
    files = {p.name: p.read_text() for p in INFRA.iterdir() if p.is_file()}
    files.update({name: (ROOT / name).read_text() for name in (".dockerignore", "constraints.txt")})
    return files


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
    (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "tokens"), "is not one of"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"]
     .__setitem__("readOnlyRootFileSystem", True), "unknown field 'readOnlyRootFileSystem'"),
    (lambda d: d["spec"]["submitterPodTemplate"]["spec"]["securityContext"].__setitem__("seccompProfile", {}),
     "missing required field 'type'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__("serviceType", "External"), "is not one of"),
])
def test_the_schema_check_rejects_what_the_api_server_would(mutate, expected):
    doc = _docs("rayjob.yaml")[0]
    assert check(doc) == []
    mutate(doc)
    errors = check(doc)
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------------------------------ cluster rules
@pytest.mark.parametrize("where,meta,cluster", _cluster_specs(), ids=[w for w, _, _ in _cluster_specs()])
def test_every_ray_container_requests_resources_and_static_keys_are_only_an_option(where, meta, cluster):
    for group, container in _containers(cluster):
        for source in container.get("envFrom", []):
            # the static-key Secret (MinIO/Ceph) may be referenced, never required: S3 comes from the pod's identity
            assert source.get("secretRef", {}).get("optional") is True, (where, group, source)
        assert not any(e.get("name", "").startswith("AWS_SECRET") for e in container.get("env", [])), (where, group)
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


def test_dockerfile_installs_every_package_the_distribution_ships():
    text = (INFRA / "Dockerfile").read_text()
    include = re.search(r'^include = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert include, "pyproject.toml: no [tool.setuptools.packages.find] include"
    packages = [name.strip(' "*') for name in include.group(1).split(",")]
    assert packages and all((ROOT / package / "__init__.py").is_file() for package in packages), packages
    for package in packages:
        assert f"COPY {package} ./{package}" in text, f"infra/Dockerfile does not copy {package}/"
    assert 'ENTRYPOINT ["tokentrim"]' in text


# ----------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("where,meta,cluster", _cluster_specs(), ids=[w for w, _, _ in _cluster_specs()])
def test_every_ray_cluster_has_token_auth_with_the_token_from_the_secret(where, meta, cluster):
    # KubeRay >= 1.6.0 sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from this Secret) on every Ray container and on a
    # RayJob's submitter, and its own dashboard client sends the token
    assert cluster.get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}, where
    assert "KubeRay v1.6.0" in (INFRA / "README.md").read_text()
    for group, container in _containers(cluster):
        # nothing may override what the operator sets
        assert not any(e["name"].startswith("RAY_AUTH") for e in container.get("env", [])), (where, group)


_AUTH_OFF = re.compile(r"RAY_AUTH_MODE\W{1,12}(?:value\W{1,6})?disabled|mode\W{1,3}disabled", re.I)


def test_ray_auth_is_never_disabled_in_infra_or_the_image():
    assert _AUTH_OFF.search("env:\n  - {name: RAY_AUTH_MODE, value: disabled}")  # the check can fail
    assert _AUTH_OFF.search("ENV RAY_AUTH_MODE=disabled") and _AUTH_OFF.search("authOptions: {mode: disabled}")
    for name, text in _infra_text().items():
        assert name.endswith(".md") or not _AUTH_OFF.search(text), name  # the README may say where it is allowed


def test_only_the_cluster_pods_and_the_submitters_reach_a_head():
    policy = _docs("networkpolicy.yaml")[0]["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"] and selector.pop("ray.io/node-type") == "head"  # set by KubeRay
    nodes, clients = [], []
    for where, template in _ray_pod_templates():
        labels = template.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), where  # every head (and so every cluster) is covered
        (clients if where.endswith("submitter") else nodes).append(labels)
    allowed_ports = set()
    for rule in policy["ingress"]:
        assert rule.get("from"), rule  # a rule without peers would admit everyone
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            wanted = peer["podSelector"]["matchLabels"]
            if peer.get("namespaceSelector") is not None:  # the KubeRay operator, wherever it runs: dashboard only
                assert wanted == {"app.kubernetes.io/name": "kuberay-operator"}
                assert [p["port"] for p in rule["ports"]] == [8265]
            elif "ports" in rule:  # submitters: dashboard (ray job submit) and Ray Client, nothing else
                assert all(wanted.items() <= c.items() for c in clients) and not any(
                    wanted.items() <= n.items() for n in nodes)
                allowed_ports |= {p["port"] for p in rule["ports"]}
            else:  # all ports: the Ray nodes themselves, and no submitter
                assert all(wanted.items() <= n.items() for n in nodes) and not any(
                    wanted.items() <= c.items() for c in clients)
    assert allowed_ports == {8265, 10001}
    # nothing exposed outside the cluster network
    for _, _, cluster in _cluster_specs():
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert not cluster["headGroupSpec"].get("enableIngress")
    objects = json.dumps([d for _, d in _all_manifests()])
    assert not re.search(r"\b(LoadBalancer|NodePort|hostNetwork|hostPort|Ingress\b\"?: ?true)\b", objects)
    assert {d["kind"] for _, d in _all_manifests()}.isdisjoint({"Service", "Ingress"})


@pytest.mark.parametrize("where,pod", _all_pod_specs(), ids=[w for w, _ in _all_pod_specs()])
def test_every_pod_runs_restricted_with_a_writable_tmp_only(where, pod):
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, where
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                           "capabilities": {"drop": ["ALL"]}}, (where, container["name"])
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        needed = ["/tmp"] + (["/tmp/ray", "/dev/shm"] if container["name"].startswith("ray-") and
                             "submitter" not in container["name"] else [])
        for path in needed:  # Ray's temp dir, its object store and every library's scratch files
            assert "emptyDir" in volumes[mounts[path]["name"]], (where, path)
        for path, mount in mounts.items():  # everything else that is mounted is read-only
            volume = volumes[mount["name"]]
            if "emptyDir" not in volume:
                assert mount.get("readOnly") is True, (where, path)
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"].get("readOnly") is True, (where, path)


def test_ray_pods_get_s3_from_a_workload_identity_scoped_to_the_job_prefixes():
    for where, template in _ray_pod_templates():
        assert template["spec"]["serviceAccountName"] == RAY_ACCOUNT, where
    account = _docs("serviceaccount.yaml")[0]
    assert account["metadata"]["name"] == RAY_ACCOUNT and account["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "${TOKENTRIM_ROLE_ARN}"
    policy = json.loads((INFRA / "s3-policy.json").read_text())
    grants = [(a, r, st.get("Condition")) for st in policy["Statement"] for a in _listed(st["Action"])
              for r in _listed(st["Resource"])]
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    assert {a for a, _, _ in grants} == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}
    for action, resource, condition in grants:
        bucket, _, prefix = resource.removeprefix("arn:aws:s3:::").partition("/")
        assert "*" not in bucket, resource
        if action == "s3:ListBucket":  # listing only under the prefixes
            assert not prefix and all(p.endswith("/*") and len(p) > 2 for p in condition["StringLike"]["s3:prefix"])
        else:
            assert prefix.endswith("/*") and len(prefix) > 2 and condition is None, resource
    writable = [r for a, r, _ in grants if a == "s3:PutObject"]
    readable = [r for a, r, _ in grants if a == "s3:GetObject"]
    for url, write in _s3_urls():  # every object the entrypoints name is inside what the role may do
        arn = "arn:aws:s3:::" + url.removeprefix("s3://")
        assert any(arn.startswith(r[:-1]) for r in (writable if write else readable)), url
        assert any(arn.startswith(f"arn:aws:s3:::{b}") for b in _policy_buckets(policy)), url
        assert any(fnmatch.fnmatch(url.split("/", 3)[3] + "/x", p) for p in _list_prefixes(policy)), url


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _policy_buckets(policy: dict) -> set[str]:
    return {_listed(st["Resource"])[0].removeprefix("arn:aws:s3:::").split("/")[0] for st in policy["Statement"]}


def _list_prefixes(policy: dict) -> list[str]:
    return [p for st in policy["Statement"] if st["Action"] == "s3:ListBucket"
            for p in st["Condition"]["StringLike"]["s3:prefix"]]


def _s3_urls() -> list[tuple[str, bool]]:
    """(s3 URL, whether the job writes there) of every entrypoint's table, --out and --baseline."""
    out = []
    for job in (_docs("rayjob.yaml")[0], _nightly()["RayJob"]):
        argv = shlex.split(job["spec"]["entrypoint"])
        out += [(a, argv[i - 1] in ("--out", "--baseline")) for i, a in enumerate(argv) if a.startswith("s3://")]
    return out


def test_the_models_claim_is_read_only_many_and_mounted_read_only():
    claim = _docs("models-pvc.yaml")[0]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    claims = {v["persistentVolumeClaim"]["claimName"] for _, pod in _all_pod_specs() for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    assert claims == {claim["metadata"]["name"]}


def test_images_come_from_one_place_pinned_by_digest():
    images = [c["image"] for _, pod in _all_pod_specs() for c in pod["containers"]]
    assert set(images) == {"${TOKENTRIM_IMAGE}", "${KUBECTL_IMAGE}"}
    for name, text in _infra_text().items():
        assert name.endswith(".md") or (":latest" not in text and "bitnami/kubectl" not in text), name
        for image in re.findall(r"^\s*image:\s*(\S+)", text, re.M):
            assert image in ("${TOKENTRIM_IMAGE}", "${KUBECTL_IMAGE}"), (name, image)


def _render(name: str, **env: str) -> subprocess.CompletedProcess:
    placeholders = ("TOKENTRIM_IMAGE", "KUBECTL_IMAGE", "TOKENTRIM_ROLE_ARN")
    clean = {k: v for k, v in os.environ.items() if k not in placeholders}
    return subprocess.run(["/bin/sh", str(INFRA / "render.sh"), str(INFRA / name)], env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


def test_render_fills_the_images_only_when_pinned_by_digest():
    pinned = {"TOKENTRIM_IMAGE": "registry.example.com/ml/tokentrim@sha256:" + "a" * 64,
              "KUBECTL_IMAGE": "docker.io/alpine/k8s:1.31.4@sha256:" + "b" * 64,
              "TOKENTRIM_ROLE_ARN": "arn:aws:iam::111122223333:role/tokentrim-ray"}
    for name in MANIFESTS:
        done = _render(name, **pinned)
        assert done.returncode == 0 and not re.search(r"\$\{(TOKENTRIM|KUBECTL)_", done.stdout), (name, done.stderr)
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        assert all(check(d) == [] for d in docs), name
    rendered = _render("nightly-cronjob.yaml", **pinned).stdout
    assert rendered.count(pinned["TOKENTRIM_IMAGE"]) == 3 and rendered.count(pinned["KUBECTL_IMAGE"]) == 1
    for bad in ("tokentrim:latest", "tokentrim", "registry.example.com/tokentrim:1.0", "x@sha256:1234"):
        done = _render("rayjob.yaml", **{**pinned, "TOKENTRIM_IMAGE": bad})
        assert done.returncode == 2 and "not pinned by digest" in done.stderr, bad
    done = _render("rayjob.yaml")
    assert done.returncode == 2 and "needs TOKENTRIM_IMAGE" in done.stderr


def test_the_image_runs_as_nobody_special_with_the_tested_torch():
    import torch

    dockerfile = (INFRA / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert "pip install -c constraints.txt ." in dockerfile and "COPY constraints.txt" in dockerfile
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert torch.__version__.split("+")[0] == pins["torch"]  # the torch the tests run with is the image's
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -c constraints.txt torch" in makefile and "-c constraints.txt -e" in makefile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "out"} <= set(ignored)


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
    (["", "PENDING ValidationFailed"], 1),  # the operator refused the spec: no job will ever run
    ([" ValidationFailed"], 1),
    (["RUNNING Running", " Complete"], 1),  # complete without a job status is no success
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


@pytest.mark.parametrize("other", ["Running", "", "Initializing", "Suspended"])  # "": just created, no status yet
def test_the_submitter_refuses_to_start_while_a_nightly_rayjob_is_unfinished(tmp_path, other):
    existing = [["tokentrim-nightly-a", "Complete"], ["tokentrim-nightly-c", "ValidationFailed"],
                ["tokentrim-nightly-b", other]]
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
    assert ctx.params["model__dtype"] == "bfloat16" and ctx.params["model__weights"]
    _workers_match(argv, doc["spec"]["rayClusterSpec"])


def test_nightly_regression_entrypoint_renders_on_the_gpus_it_requests():
    rayjob = _nightly()["RayJob"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["tokentrim", "-v", "regress"]
    ctx = _parse_only(argv[1:])
    assert ctx.params["model__dtype"] == "bfloat16" and ctx.params["model__weights"]
    assert ctx.params["rollout__mode"] == "self-forcing"
    _workers_match(argv, rayjob["spec"]["rayClusterSpec"])


def test_the_readme_seeding_command_makes_a_baseline_run_of_the_nightly_template(tmp_path):
    readme = (INFRA / "README.md").read_text()
    seed = re.search(r"\| (sed -e .*?) \| kubectl create -f -", readme)
    assert seed, "infra/README.md: no seeding command"
    template = _nightly()["ConfigMap"]["data"]["regress-rayjob.yaml"]
    done = subprocess.run(["/bin/sh", "-c", seed.group(1)], input=template, capture_output=True, text=True, timeout=30)
    rayjob = yaml.safe_load(done.stdout)
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    ctx = _parse_only(argv[1:])
    assert ctx.params["update_baseline"] is True and ctx.params["out_url"].endswith("/nightly/seed")
    assert ctx.params["baseline_url"] == shlex.split(_nightly()["RayJob"]["spec"]["entrypoint"])[
        argv.index("--baseline") + 1]
    assert rayjob["metadata"]["labels"] == _nightly()["RayJob"]["metadata"]["labels"]  # the nightly waits for it


def test_cli_help_lists_every_command():
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("render", "submit", "resume", "status", "regress", "demo"):
        assert command in out
