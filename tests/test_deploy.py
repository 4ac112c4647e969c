"""Deployment files: docker-compose.yml, Dockerfiles, Kubernetes manifests, Grafana dashboard.

No Docker engine or cluster runs here, so files are checked by what can run offline:
``docker compose config`` when the compose plugin is installed (else the compose-spec JSON
schema that check-jsonschema ships), kubernetes-validate's strict schemas for built-in
kinds, a schema of our own for KEDA's ScaledObject, and the rules that keep jobs safe
(grace period above the longest stage, one GPU per worker).
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from easel.shared.registry import Registry
from easel.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.33.0"
FAMILIES = {"sd15", "sdxl"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid():
    cmd = _compose_cli()
    if cmd:  # the real parser, interpolation and merge included
        r = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                           text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
        assert r.returncode == 0, r.stderr
    schema = json.loads((resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json")
                        .read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())]
    assert not errors, errors


def test_compose_services_redis_aof_and_one_gpu_per_worker():
    c = compose()
    assert {"redis", "seaweedfs", "api", "flower"} <= set(c["services"])
    cmd = c["services"]["redis"]["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in cmd
    assert c["services"]["api"]["environment"]["EASEL_REDIS_URL"] == "redis://redis:6379/0"
    workers = {n: s for n, s in c["services"].items() if n.startswith("worker-")}
    devices, families = [], set()
    for name, svc in workers.items():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1, name
        devices.append(dev["device_ids"][0])
        fam = svc["command"][svc["command"].index("--family") + 1]
        assert name.startswith(f"worker-{fam}-gpu"), name
        families.add(fam)
        assert any(v.endswith(":/models") for v in svc["volumes"]), "model cache volume"
        grace = re.fullmatch(r"(\d+)m", svc["stop_grace_period"])
        assert grace, name
        # a stopping worker finishes its stage: no stage may outlast the grace period
        assert float(svc["environment"]["EASEL_STAGE_TIMEOUT_MAX_S"]) < 60 * int(grace.group(1)), name
    assert len(devices) == len(set(devices)) == len(workers) >= 2  # one service per GPU
    assert families == FAMILIES
    reg = Registry.load(ROOT / "infra" / "models.example.yaml")
    assert set(reg.families()) == FAMILIES


def test_dockerfiles_cuda_base_non_root_and_model_volume():
    worker = (ROOT / "infra" / "docker" / "worker.Dockerfile").read_text()
    api = (ROOT / "infra" / "docker" / "api.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", worker, re.M) and "FROM ${CUDA_IMAGE}" in worker
    assert 'VOLUME ["/models"]' in worker and "HF_HOME=/models/hf" in worker
    for text in (worker, api):
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and not users[-1].startswith(("root", "0")), users
    c = compose()
    assert c["x-worker"]["build"]["dockerfile"] == "infra/docker/worker.Dockerfile"
    assert c["services"]["api"]["build"]["dockerfile"] == "infra/docker/api.Dockerfile"


def test_k8s_manifests_validate_against_schemas():
    so_schema = json.loads((K8S / "schemas" / "scaledobject.schema.json").read_text())
    kinds = []
    for _name, doc in k8s_docs():
        kinds.append(doc["kind"])
        if doc["kind"] == "ScaledObject":
            jsonschema.validate(doc, so_schema, cls=jsonschema.Draft202012Validator)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "PodDisruptionBudget", "ScaledObject", "ConfigMap", "Service"} <= set(kinds)
    # The validators do refuse mistakes (a typo'd field, a bad trigger).
    dep = copy.deepcopy(by_kind("Deployment")["easel-worker-sd15"])
    dep["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    so = copy.deepcopy(by_kind("ScaledObject")["easel-worker-sd15"])
    so["spec"]["triggers"][0]["metadata"]["listLength"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, so_schema)
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_k8s_kustomization_builds():
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sum(1 for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "ScaledObject") == len(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_k8s_worker_pool_drains_safely_and_scales_on_all_priority_lists(family):
    dep = by_kind("Deployment")[f"easel-worker-{family}"]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["args"][ctr["args"].index("--family") + 1] == family
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1 == ctr["resources"]["requests"]["nvidia.com/gpu"]
    cap = float({e["name"]: e.get("value") for e in ctr["env"]}["EASEL_STAGE_TIMEOUT_MAX_S"])
    # a stage at the cap, the watchdog's grace past it, and a few minutes to write its outputs
    assert cap + Settings().stage_stuck_grace_s + 300 <= pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    pdb = by_kind("PodDisruptionBudget")[f"easel-worker-{family}"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    so = by_kind("ScaledObject")[f"easel-worker-{family}"]["spec"]
    assert so["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    queue = f"easel.{family}"  # kombu: priority 0 in the queue's list, priority p in "<queue>:<p>"
    lists = {t["metadata"]["listName"]: t["name"] for t in so["triggers"] if t["type"] == "redis"}
    # ... and the jobs pending their tenant's turn (fair share), tallied in a list of their own
    assert set(lists) == {queue} | {f"{queue}:{p}" for p in range(1, 10)} | {f"easel:backlog:{queue}"}
    formula = so["advanced"]["scalingModifiers"]["formula"]
    assert sorted(x.strip() for x in formula.split("+")) == sorted(lists.values())  # summed, not max'ed
    registry = Registry.model_validate(yaml.safe_load(by_kind("ConfigMap")["easel-models"]["data"]["models.yaml"]))
    assert family in registry.families()


def test_grafana_dashboard_queries_only_series_easel_exposes():
    dash = json.loads((ROOT / "infra" / "grafana" / "easel-dashboard.json").read_text())
    sources = "".join((ROOT / p).read_text() for p in ("shared/metrics.py", "worker/metrics.py",
                                                         "producer/api/metrics.py"))
    declared = set(re.findall(r'"(easel_[a-z_]+)"', sources))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"\beasel_[a-z_]+", e)}
    assert used and used <= declared, used - declared
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("queue depth", "jobs by state", "stage duration", "gpu memory", "load time", "batch size"):
        assert topic in titles


def test_k8s_redis_refuses_writes_before_its_container_limit_kills_it():
    (redis,) = [d for _, d in k8s_docs() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "easel-redis"]
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    units = {"gb": 1 << 30, "mb": 1 << 20}
    maxmemory = args[args.index("--maxmemory") + 1]
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert int(maxmemory[:-2]) * units[maxmemory[-2:]] < int(limit[:-2]) * (1 << 30)
