"""A compact schema of the Kubernetes / KubeRay fields that infra/ uses, and a checker.

Field names and types follow the KubeRay API reference (ray.io/v1: RayCluster, RayJob, HeadGroupSpec,
WorkerGroupSpec, SubmitterConfig, AuthOptions) and the core Kubernetes objects (batch/v1 CronJob and Job, v1 Pod
template with its security contexts, ConfigMap, ServiceAccount, PersistentVolumeClaim, networking.k8s.io/v1
NetworkPolicy, rbac.authorization.k8s.io/v1 Role and RoleBinding). Only the parts of those APIs that
the manifests here may use are listed: an unknown field, a wrong type or a value outside an enum is an error, as the
API server's structural-schema validation would report it (KubeRay's CRDs prune or reject unknown fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Obj:
    fields: dict[str, Any]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Map:
    """Any string keys, values of one schema."""

    value: Any


@dataclass(frozen=True)
class List:
    item: Any


@dataclass(frozen=True)
class Enum:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Pattern:
    """A string matching a regular expression (e.g. a resource quantity)."""

    regex: str
    flags: int = field(default=0)


QUANTITY = Pattern(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
NAME = Pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
INT, STR, BOOL, FLOAT = int, str, bool, float

OBJECT_META = Obj({"name": NAME, "generateName": Pattern(r"^[a-z0-9][-a-z0-9]*-$"), "namespace": NAME,
                   "labels": Map(STR), "annotations": Map(STR)})
RESOURCES = Obj({"requests": Map(QUANTITY), "limits": Map(QUANTITY)})
SECCOMP = Obj({"type": Enum(("RuntimeDefault", "Localhost", "Unconfined")), "localhostProfile": STR},
              required=("type",))
CONTAINER_SECURITY = Obj({"allowPrivilegeEscalation": BOOL, "readOnlyRootFilesystem": BOOL, "runAsNonRoot": BOOL,
                          "runAsUser": INT, "runAsGroup": INT, "privileged": BOOL, "seccompProfile": SECCOMP,
                          "capabilities": Obj({"add": List(STR), "drop": List(STR)})})
POD_SECURITY = Obj({"runAsNonRoot": BOOL, "runAsUser": INT, "runAsGroup": INT, "fsGroup": INT,
                    "supplementalGroups": List(INT), "seccompProfile": SECCOMP})
LABEL_SELECTOR = Obj({"matchLabels": Map(STR), "matchExpressions": List(Obj({
    "key": STR, "operator": Enum(("In", "NotIn", "Exists", "DoesNotExist")), "values": List(STR)},
    required=("key", "operator")))})
CONTAINER = Obj({
    "name": NAME, "image": STR, "imagePullPolicy": Enum(("Always", "IfNotPresent", "Never")),
    "command": List(STR), "args": List(STR),
    "env": List(Obj({"name": STR, "value": STR,
                     "valueFrom": Obj({"secretKeyRef": Obj({"name": NAME, "key": STR}),
                                       "fieldRef": Obj({"fieldPath": STR})})}, required=("name",))),
    "envFrom": List(Obj({"secretRef": Obj({"name": NAME, "optional": BOOL}, ("name",)),
                         "configMapRef": Obj({"name": NAME, "optional": BOOL}, ("name",)), "prefix": STR})),
    "resources": RESOURCES, "securityContext": CONTAINER_SECURITY,
    "volumeMounts": List(Obj({"name": NAME, "mountPath": STR, "readOnly": BOOL, "subPath": STR},
                             required=("name", "mountPath"))),
}, required=("name", "image"))
VOLUME = Obj({"name": NAME, "persistentVolumeClaim": Obj({"claimName": NAME, "readOnly": BOOL}, ("claimName",)),
              "configMap": Obj({"name": NAME, "defaultMode": INT}, ("name",)),
              "secret": Obj({"secretName": NAME}, ("secretName",)),
              "emptyDir": Obj({"medium": STR, "sizeLimit": QUANTITY})},
             required=("name",))
POD_TEMPLATE = Obj({"metadata": OBJECT_META, "spec": Obj({
    "containers": List(CONTAINER), "volumes": List(VOLUME), "serviceAccountName": NAME,
    "automountServiceAccountToken": BOOL, "securityContext": POD_SECURITY,
    "restartPolicy": Enum(("Always", "OnFailure", "Never")), "nodeSelector": Map(STR),
    "tolerations": List(Map(STR)),
}, required=("containers",))}, required=("spec",))

# ---- KubeRay ray.io/v1
HEAD_GROUP = Obj({"template": POD_TEMPLATE, "rayStartParams": Map(STR),
                  "serviceType": Enum(("ClusterIP", "NodePort", "LoadBalancer")), "enableIngress": BOOL,
                  "headService": Map(Any)}, required=("template",))
WORKER_GROUP = Obj({"groupName": NAME, "replicas": INT, "minReplicas": INT, "maxReplicas": INT,
                    "idleTimeoutSeconds": INT, "rayStartParams": Map(STR), "template": POD_TEMPLATE,
                    "scaleStrategy": Obj({"workersToDelete": List(STR)}), "numOfHosts": INT, "suspend": BOOL},
                   required=("groupName", "template"))
RAY_CLUSTER_SPEC = Obj({"rayVersion": Pattern(r"^\d+\.\d+\.\d+$"), "headGroupSpec": HEAD_GROUP,
                        "workerGroupSpecs": List(WORKER_GROUP), "enableInTreeAutoscaling": BOOL,
                        "autoscalerOptions": Map(Any), "headServiceAnnotations": Map(STR), "suspend": BOOL,
                        "managedBy": STR,
                        # KubeRay >= 1.5.1 (mode), >= 1.6.0 (secretName, enableK8sTokenAuth)
                        "authOptions": Obj({"mode": Enum(("disabled", "token")), "secretName": NAME,
                                            "enableK8sTokenAuth": BOOL})}, required=("headGroupSpec",))
RAY_JOB_SPEC = Obj({
    "entrypoint": STR, "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": Map(STR),
    "shutdownAfterJobFinishes": BOOL, "ttlSecondsAfterFinished": INT, "activeDeadlineSeconds": INT,
    "backoffLimit": INT, "submissionMode": Enum(("K8sJobMode", "HTTPMode", "InteractiveMode")),
    "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": Obj({"backoffLimit": INT}), "runtimeEnvYAML": STR,
    "jobId": STR, "entrypointNumCpus": FLOAT, "entrypointNumGpus": FLOAT, "entrypointResources": STR,
    "suspend": BOOL, "metadata": Map(STR),
}, required=("entrypoint",))

# ---- core Kubernetes
JOB_SPEC = Obj({"template": POD_TEMPLATE, "backoffLimit": INT, "activeDeadlineSeconds": INT,
                "ttlSecondsAfterFinished": INT, "completions": INT, "parallelism": INT}, required=("template",))
CRON_JOB_SPEC = Obj({"schedule": STR, "timeZone": STR, "concurrencyPolicy": Enum(("Allow", "Forbid", "Replace")),
                     "startingDeadlineSeconds": INT, "successfulJobsHistoryLimit": INT,
                     "failedJobsHistoryLimit": INT, "suspend": BOOL,
                     "jobTemplate": Obj({"metadata": OBJECT_META, "spec": JOB_SPEC}, required=("spec",))},
                    required=("schedule", "jobTemplate"))
POLICY_RULE = Obj({"apiGroups": List(STR), "resources": List(STR), "verbs": List(STR), "resourceNames": List(STR)},
                  required=("verbs",))

NETWORK_PEER = Obj({"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
                    "ipBlock": Obj({"cidr": STR, "except": List(STR)}, ("cidr",))})
NETWORK_PORT = Obj({"protocol": Enum(("TCP", "UDP", "SCTP")), "port": INT, "endPort": INT})
NETWORK_POLICY_SPEC = Obj({
    "podSelector": LABEL_SELECTOR, "policyTypes": List(Enum(("Ingress", "Egress"))),
    "ingress": List(Obj({"from": List(NETWORK_PEER), "ports": List(NETWORK_PORT)})),
    "egress": List(Obj({"to": List(NETWORK_PEER), "ports": List(NETWORK_PORT)})),
}, required=("podSelector",))
PVC_SPEC = Obj({"accessModes": List(Enum(("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"))),
                "resources": Obj({"requests": Map(QUANTITY), "limits": Map(QUANTITY)}), "storageClassName": STR,
                "volumeName": STR, "volumeMode": Enum(("Filesystem", "Block"))}, required=("accessModes", "resources"))

KINDS: dict[tuple[str, str], Obj] = {
    ("ray.io/v1", "RayCluster"): Obj({"spec": RAY_CLUSTER_SPEC}, required=("spec",)),
    ("ray.io/v1", "RayJob"): Obj({"spec": RAY_JOB_SPEC}, required=("spec",)),
    ("batch/v1", "CronJob"): Obj({"spec": CRON_JOB_SPEC}, required=("spec",)),
    ("v1", "ConfigMap"): Obj({"data": Map(STR)}),
    ("v1", "ServiceAccount"): Obj({"automountServiceAccountToken": BOOL}),
    ("v1", "PersistentVolumeClaim"): Obj({"spec": PVC_SPEC}, required=("spec",)),
    ("networking.k8s.io/v1", "NetworkPolicy"): Obj({"spec": NETWORK_POLICY_SPEC}, required=("spec",)),
    ("rbac.authorization.k8s.io/v1", "Role"): Obj({"rules": List(POLICY_RULE)}, required=("rules",)),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Obj({
        "subjects": List(Obj({"kind": Enum(("ServiceAccount", "User", "Group")), "name": STR, "namespace": NAME},
                             required=("kind", "name"))),
        "roleRef": Obj({"apiGroup": STR, "kind": Enum(("Role", "ClusterRole")), "name": NAME},
                       required=("apiGroup", "kind", "name")),
    }, required=("roleRef",)),
}


def check(doc: Any) -> list[str]:
    """Errors of one manifest document (``apiVersion``/``kind`` picked from the document), as ``path: problem``."""
    if not isinstance(doc, dict):
        return [f"<root>: expected a mapping, got {type(doc).__name__}"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        return [f"<root>: unknown apiVersion/kind {key}"]
    top = KINDS[key]
    schema = Obj({"apiVersion": STR, "kind": STR, "metadata": OBJECT_META, **top.fields},
                 required=("apiVersion", "kind", "metadata", *top.required))
    errors: list[str] = []
    _check(doc, schema, doc["kind"], errors)
    meta = doc.get("metadata") or {}
    if isinstance(meta, dict) and ("name" in meta) == ("generateName" in meta):
        errors.append(f"{doc['kind']}.metadata: exactly one of name and generateName")
    return errors


def _check(value: Any, schema: Any, path: str, errors: list[str]) -> None:
    if schema is Any:
        return
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {value!r}")
            return
        errors.extend(f"{path}: unknown field {k!r}" for k in value if k not in schema.fields)
        errors.extend(f"{path}: missing required field {k!r}" for k in schema.required if k not in value)
        for k, v in value.items():
            if k in schema.fields:
                _check(v, schema.fields[k], f"{path}.{k}", errors)
    elif isinstance(schema, Map):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {value!r}")
            return
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: key {k!r} is not a string")
            _check(v, schema.value, f"{path}[{k!r}]", errors)
    elif isinstance(schema, List):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return
        for i, v in enumerate(value):
            _check(v, schema.item, f"{path}[{i}]", errors)
    elif isinstance(schema, Enum):
        if value not in schema.values:
            errors.append(f"{path}: {value!r} is not one of {schema.values}")
    elif isinstance(schema, Pattern):
        if not isinstance(value, str) or not re.match(schema.regex, value, schema.flags):
            errors.append(f"{path}: {value!r} does not match {schema.regex}")
    elif schema is FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
    elif schema in (INT, BOOL, STR):
        # YAML's bool is not an int here (Kubernetes would refuse `replicas: true`)
        if not isinstance(value, schema) or (schema is INT and isinstance(value, bool)):
            errors.append(f"{path}: expected {schema.__name__}, got {value!r}")
    else:  # pragma: no cover - a schema written wrong
        raise TypeError(f"bad schema node at {path}: {schema!r}")
