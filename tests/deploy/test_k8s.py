"""deploy/k8s/ (issue 12.3): the kustomize base and the example overlay render with `kubectl kustomize`, every
object is valid against the Kubernetes schemas of the pinned version (kubernetes-validate, strict: unknown fields
fail) and the KEDA ScaledObject against deploy/schemas/keda-scaledobject-v1alpha1.json; then what the manifests
promise: probes, replicas, disruption budget, scaling bounds, shutdown timings, secrets as files."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.settings_names import known_names, secret_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still supported by the managed services when this was written
KEDA_SCHEMA = json.loads((ROOT / "deploy" / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
KUSTOMIZATIONS = ["base", "overlays/example"]
SECRET_MOUNT = "/run/secrets/kling-relay"


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is part of this machine; see deploy/README.md"
    done = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def config(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    [found] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("kling-relay-")]
    data: dict[str, str] = found["data"]
    return data


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_is_valid_against_its_schema(path: str) -> None:
    objects = render(path)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Ingress", "NetworkPolicy", "ConfigMap",
                                           "PodDisruptionBudget", "ScaledObject"}
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            jsonschema.validate(obj, KEDA_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validation_does_refuse_mistakes() -> None:
    web = json.loads(json.dumps(find(render("base"), "Deployment", "web")))
    container(web)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(find(render("base"), "ScaledObject", "worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = "submit"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_web_has_replicas_probes_a_budget_and_resources(path: str) -> None:
    objects = render(path)
    web = find(objects, "Deployment", "web")
    assert web["spec"]["replicas"] >= 2
    main = container(web)
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"  # not /healthz: it fails while Redis is down
    assert main["args"] == ["web"]
    budget = find(objects, "PodDisruptionBudget", "web")
    assert budget["spec"]["selector"]["matchLabels"] == web["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["minAvailable"] >= 1
    for deployment in [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]:
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]


def test_web_shutdown_drains_before_gunicorn_stops() -> None:
    """The pod leaves the endpoints during preStop, then gunicorn's graceful_timeout must fit in what is left."""
    web = find(render("base"), "Deployment", "web")
    grace = web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = int(container(web)["lifecycle"]["preStop"]["exec"]["command"][-1])
    gunicorn = runpy.run_path(str(ROOT / "deploy" / "gunicorn.conf.py"))
    assert sleep + gunicorn["graceful_timeout"] < grace


def test_workers_scale_on_the_submit_and_copy_lists_within_the_in_flight_cap() -> None:
    objects = render("overlays/example")
    settings = config(objects)
    concurrency, in_flight = int(settings["WORKER_CONCURRENCY"]), int(settings["KLING_MAX_IN_FLIGHT"])
    scaled = find(objects, "ScaledObject", "worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "worker"
    assert sorted(t["metadata"]["listName"] for t in spec["triggers"]) == ["copy", "submit"]
    assert {t["metadata"]["listLength"] for t in spec["triggers"]} == {str(concurrency)}
    assert spec["minReplicaCount"] >= 1  # notify and reconcile always need a consumer
    assert spec["maxReplicaCount"] == -(-in_flight // concurrency)  # ceil(KLING_MAX_IN_FLIGHT / concurrency)
    namespace = find(objects, "Deployment", "worker")["metadata"]["namespace"]
    for trigger in spec["triggers"]:
        assert trigger["metadata"]["address"] == f"redis.{namespace}.svc.cluster.local:6379"
    assert settings["REDIS_URL"] == "redis://redis:6379/0"
    worker = find(objects, "Deployment", "worker")
    assert container(worker)["args"] == ["worker"]
    # a copy gets minutes to finish; one cut off is redelivered and its lock expires within JOB_LOCK_SECONDS
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120


def test_beat_is_exactly_one_and_recreated() -> None:
    beat = find(render("overlays/example"), "Deployment", "beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    assert container(beat)["args"] == ["beat"]
    assert container(beat)["workingDir"] == "/tmp"  # the schedule file; the root filesystem is read-only


def test_ingress_exposes_only_the_callback_and_api_paths() -> None:
    ingress = find(render("overlays/example"), "Ingress", "web")
    [rule] = ingress["spec"]["rules"]
    paths = {p["path"] for p in rule["http"]["paths"]}
    assert paths == {"/callbacks/kling/", "/v1/", "/openapi.json"}
    assert rule["host"] == "relay.example.com" and ingress["spec"]["tls"][0]["hosts"] == ["relay.example.com"]
    public = config(render("overlays/example"))["PUBLIC_BASE_URL"]
    assert public == f"https://{rule['host']}"


def test_network_policies_cover_every_relay_pod() -> None:
    objects = render("overlays/example")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    default = find(objects, "NetworkPolicy", "kling-relay-default-deny")
    assert set(default["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    selector = default["spec"]["podSelector"]["matchLabels"]
    for deployment in [o for o in objects if o["kind"] == "Deployment"]:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    egress_ports = {p["port"] for rule in default["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 6379, 443}
    assert any(p["metadata"]["name"] == "redis-ingress" for p in policies)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_secrets_are_mounted_files_and_the_rest_a_config_map(path: str) -> None:
    objects = render(path)
    settings = config(objects)
    assert set(settings) <= known_names(), set(settings) - known_names()
    assert not set(settings) & secret_names()
    for key, value in settings.items():
        if key.endswith("_FILE"):
            assert value.startswith(SECRET_MOUNT + "/"), key
    for deployment in [o for o in objects if o["kind"] == "Deployment"]:
        pod = deployment["spec"]["template"]["spec"]
        main = container(deployment)
        assert "env" not in main, "settings come from the ConfigMap, secrets from files"
        assert [e["configMapRef"]["name"] for e in main["envFrom"]] == [config_name(objects)]
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert mounts["secrets"]["mountPath"] == SECRET_MOUNT and mounts["secrets"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == "kling-relay-secrets"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["automountServiceAccountToken"] is False


def config_name(objects: tuple[dict[str, Any], ...]) -> str:
    [name] = [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
    assert re.fullmatch(r"kling-relay-config-[a-z0-9]+", name)  # a hash suffix: a change rolls the pods
    return name
