"""Cluster configs: Ray cluster-launcher YAMLs, KubeRay manifests, Kubernetes CronJob, systemd/cron units.

The launcher configs go through Ray's own pipeline (``prepare_config`` merges the provider's
defaults.yaml, then ``validate_config`` checks ray-schema.json), exactly what ``ray up`` does before
it contacts the cloud.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = [ROOT / "ray_cluster.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = CLUSTER / "kuberay"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _strings(obj):
    """Every string (keys and values) in a parsed YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(_load(path)))


# --------------------------------------------------------------------------- every YAML parses


def test_every_yaml_parses():
    paths = sorted([ROOT / "ray_cluster.yaml", *CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])
    assert len(paths) >= 7, paths
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


# --------------------------------------------------------------------------- no 0.0.0.0 binds

_CONFIG_SUFFIXES = {".yaml", ".yml", ".sh", ".service", ".timer", ".cron", ".json", ".toml", ".env"}


def _config_files():
    files = [ROOT / "ray_cluster.yaml"]
    for p in CLUSTER.rglob("*"):
        if p.is_file() and (p.suffix in _CONFIG_SUFFIXES or p.name == "Dockerfile"):
            files.append(p)
    return files


def test_no_wildcard_bind_anywhere_in_cluster_files():
    files = _config_files()
    assert ROOT / "cluster" / "nightly.sh" in files and len(files) >= 11
    offenders = [str(p.relative_to(ROOT)) for p in files if "0.0.0.0" in p.read_text()]
    assert offenders == []


def test_readme_never_binds_wildcard_in_commands():
    text = (CLUSTER / "README.md").read_text()
    bind_flags = re.findall(r"--(?:host|dashboard-host|address|bind)[= ]+(\S+)", text)
    assert bind_flags, "README shows no bind flags at all"
    assert all(not v.startswith("0.0.0.0") for v in bind_flags), bind_flags
    assert "mlflow server --host 127.0.0.1" in text
    assert "CVE-2023-48022" in text and "ray get-auth-token --generate" in text
    assert "RayCronJob" in text and "feature gate" in text.lower()


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    from ray.autoscaler._private.util import validate_config

    prepared = _prepared(path)
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    # prepare_config merged the provider defaults: ours must still win where it matters.
    assert prepared["provider"]["type"] in {"aws", "gcp"}
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validation_is_not_a_rubber_stamp():
    """The same validator rejects a config with an unknown key and a head type that is not defined."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = _prepared(ROOT / "ray_cluster.yaml")
    bad["available_node_types"]["ray.worker.gpu"]["gpus"] = 1  # not in ray-schema.json
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = _prepared(ROOT / "ray_cluster.yaml")
    bad["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validate_config(bad)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_after_ray_defaults_binds_loopback_only(path):
    prepared = _prepared(path)
    assert not [s for s in _strings(prepared) if "0.0.0.0" in s]
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start


def test_ray_defaults_would_bind_every_interface():
    """Why head_start_ray_commands is overridden: Ray's AWS defaults bind the dashboard to 0.0.0.0."""
    cfg = _load(ROOT / "ray_cluster.yaml")
    del cfg["head_start_ray_commands"]
    from ray.autoscaler._private.util import prepare_config

    merged = prepare_config(cfg)
    assert any("--dashboard-host=0.0.0.0" in s for s in merged["head_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_token_auth_and_project_install(path):
    cfg = _load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert len(start) == 1, key
        # the env var is exported in the same shell command that runs `ray start`
        assert re.search(r"export RAY_AUTH_MODE=token\b.*;.*ray start", start[0], re.S), start[0]
    remote, local = next((r, l) for r, l in cfg["file_mounts"].items() if r.endswith(".ray/auth_token"))
    assert local.endswith(".ray/auth_token")
    assert any(local == "." for local in cfg["file_mounts"].values())  # the project working dir
    assert any(re.search(r"pip install -e ~/oodlib\b", c) for c in cfg["setup_commands"])
    assert ".gitignore" in cfg["rsync_filter"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_node_types(path):
    cfg = _load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # CPU head
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert len(gpu) >= 2, "on-demand and spot/preemptible GPU worker types"
    for name, t in gpu.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name  # autoscales from zero
    assert sum(t["max_workers"] for t in workers.values()) >= cfg["max_workers"] >= 1

    def is_spot(nc):
        return (nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or nc.get("scheduling", {}).get("preemptible") is True)

    spot = [k for k, t in gpu.items() if is_spot(t["node_config"])]
    on_demand = [k for k, t in gpu.items() if not is_spot(t["node_config"])]
    assert spot and on_demand, (spot, on_demand)
    if cfg["provider"]["type"] == "aws":
        assert {t["node_config"]["InstanceType"] for t in gpu.values()} == {"g5.xlarge"}
    else:
        for t in gpu.values():
            assert t["node_config"]["guestAccelerators"][0]["acceleratorCount"] == 1
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


# --------------------------------------------------------------------------- KubeRay


def _check_pod_template(tpl, where, gpu: bool):
    containers = tpl["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert isinstance(c.get("name"), str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", c["name"]), where
        assert isinstance(c.get("image"), str) and c["image"], where
    if gpu:
        limits = containers[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, where


def _check_ray_cluster_spec(spec, where):
    assert spec["authOptions"]["mode"] == "token", where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert re.fullmatch(r"2\.60\.\d+", spec["rayVersion"]), where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", where  # never LoadBalancer/NodePort
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] != "0.0.0.0"
    _check_pod_template(head["template"], f"{where}: head", gpu=False)
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), where
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"{where}: {g.get('groupName')} lacks {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                           for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        _check_pod_template(g["template"], f"{where}: {g['groupName']}", gpu=True)
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 2  # autoscaled from zero


def test_kuberay_raycluster():
    doc = _load(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"], "raycluster.yaml")


def test_kuberay_rayjob():
    doc = _load(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].split() == ["python", "-m", "jobs.nightly", "--config", "configs/imagenet.yaml", "--set", "output=/data/outputs"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/app"
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_kuberay_raycronjob():
    text = (KUBERAY / "raycronjob.yaml").read_text()
    assert "RayCronJob" in text and "feature gate" in text.lower() and "1.6" in text
    doc = yaml.safe_load(text)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    assert doc["metadata"]["name"]
    assert _valid_cron(doc["spec"]["schedule"])
    job = doc["spec"]["jobTemplate"]
    assert job["entrypoint"].split()[:3] == ["python", "-m", "jobs.nightly"]
    assert "--schedule nightly" in job["entrypoint"]
    _check_ray_cluster_spec(job["rayClusterSpec"], "raycronjob.yaml")


def test_kuberay_cluster_specs_are_in_sync():
    a = _load(KUBERAY / "raycluster.yaml")["spec"]
    b = _load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
    c = _load(KUBERAY / "raycronjob.yaml")["spec"]["jobTemplate"]["rayClusterSpec"]
    assert a == b == c


def test_kuberay_checks_catch_a_missing_field():
    spec = _load(KUBERAY / "raycluster.yaml")["spec"]
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(AssertionError):
        _check_ray_cluster_spec(spec, "mutated")
    spec = _load(KUBERAY / "raycluster.yaml")["spec"]
    spec["authOptions"]["mode"] = "disabled"
    with pytest.raises(AssertionError):
        _check_ray_cluster_spec(spec, "mutated")


def test_networkpolicy_limits_ingress_to_ray_pods():
    doc = _load(KUBERAY / "networkpolicy.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    labels = _load(KUBERAY / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    sel = doc["spec"]["podSelector"]["matchLabels"]
    assert sel.items() <= labels.items()
    peers = [p for rule in doc["spec"]["ingress"] for p in rule["from"]]
    assert peers and all("ipBlock" not in p for p in peers)  # no CIDR (internet) peers


# --------------------------------------------------------------------------- Kubernetes CronJob


def _valid_cron(expr: str) -> bool:
    fields = expr.split()
    return len(fields) == 5 and all(re.fullmatch(r"[0-9*/,\-]+", f) for f in fields)


def test_kubernetes_cronjob_runs_nightly_script():
    doc = _load(CLUSTER / "kubernetes" / "cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert _valid_cron(spec["schedule"]) and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    c = pod["containers"][0]
    assert c["name"] and c["image"]
    assert c["command"][-1] == "cluster/nightly.sh"
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    cluster_name = _load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster_name
    assert env["RAY_ADDRESS"]["value"] == f"http://{cluster_name}-head-svc:8265"
    assert (ROOT / env["CONFIG"]["value"]).name == "imagenet.yaml"
    # the Kubernetes deadline leaves room for the script's own timeout handling
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] > int(env["POLL_TIMEOUT_S"]["value"])


# --------------------------------------------------------------------------- systemd / cron


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    cur = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        cur.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_units():
    svc = _unit(CLUSTER / "systemd" / "oodlib-nightly.service")
    timer = _unit(CLUSTER / "systemd" / "oodlib-nightly.timer")
    assert svc["Service"]["Type"] == ["oneshot"]
    assert svc["Service"]["ExecStart"][0].endswith("/cluster/nightly.sh")
    workdir = svc["Service"]["WorkingDirectory"][0]
    assert svc["Service"]["ExecStart"][0] == f"{workdir}/cluster/nightly.sh"
    env = dict(e.split("=", 1) for e in svc["Service"]["Environment"])
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert timer["Timer"]["Unit"] == ["oodlib-nightly.service"]
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    # the launcher config syncs the project to ~/oodlib of ssh_user: the units run it from there
    user = _load(ROOT / "ray_cluster.yaml")["auth"]["ssh_user"]
    assert workdir == f"/home/{user}/oodlib" and svc["Service"]["User"] == [user]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    svc = (CLUSTER / "systemd" / "oodlib-nightly.service").read_text()
    # verify needs an existing executable: point ExecStart at this checkout's script
    svc = re.sub(r"^ExecStart=.*$", f"ExecStart={CLUSTER / 'nightly.sh'}", svc, flags=re.M)
    (tmp_path / "oodlib-nightly.service").write_text(svc)
    shutil.copy(CLUSTER / "systemd" / "oodlib-nightly.timer", tmp_path)
    (tmp_path / "bad.service").write_text("[Service]\nExecStart=/bin/true\nExecStrat=/bin/true\n")

    def verify(*names):
        return subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in names]],
                              capture_output=True, text=True, timeout=30)

    bad = verify("bad.service")
    assert "ExecStrat" in bad.stdout + bad.stderr  # the check does report a typo
    ok = verify("oodlib-nightly.service", "oodlib-nightly.timer")
    assert ok.returncode == 0 and (ok.stdout + ok.stderr).strip() == "", ok.stdout + ok.stderr
    timer = _unit(CLUSTER / "systemd" / "oodlib-nightly.timer")
    cal = subprocess.run(["systemd-analyze", "calendar", timer["Timer"]["OnCalendar"][0]],
                         capture_output=True, text=True, timeout=30)
    assert cal.returncode == 0 and "02:00:00" in cal.stdout


def test_cron_file():
    lines = [l for l in (CLUSTER / "cron" / "oodlib-nightly.cron").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    env = dict(l.split("=", 1) for l in lines if re.match(r"^[A-Z_]+=", l))
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    jobs = [l for l in lines if not re.match(r"^[A-Z_]+=", l)]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    assert _valid_cron(" ".join(fields[:5]))
    user, command = fields[5], fields[6]
    assert user == _load(ROOT / "ray_cluster.yaml")["auth"]["ssh_user"]  # /etc/cron.d has a user field
    assert "cluster/nightly.sh" in command
    assert re.search(r"(?<!\\)%", command) is None, "unescaped % ends the command in crontab"
