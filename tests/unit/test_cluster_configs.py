"""Shipped cluster configs: the launcher YAML passes Ray's own schema and `ray up`'s config
preparation, the KubeRay manifests have what the operator needs, `plan --cluster` reads the
launcher YAML, the 70B run config validates, and the Grafana dashboard queries the metric names
metrics_export.py exports."""
import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from raytune_llama.cli.main import main
from raytune_llama.config import load_config
from raytune_llama.trainer.metrics_export import METRICS, prometheus_name

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
MI250 = "accelerator_type:AMD-Instinct-MI250X-MI250"


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "mi250.yaml").read_text())


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def test_launcher_yaml_passes_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher(), schema)


def test_launcher_yaml_survives_ray_up_preparation():
    from ray.autoscaler._private.commands import _bootstrap_config

    # What `ray up` does before it opens any ssh connection (prepare, validate, bootstrap).
    cfg = _bootstrap_config(copy.deepcopy(launcher()), no_config_cache=True)
    node = cfg["available_node_types"][cfg["head_node_type"]]
    assert node["resources"]["GPU"] == 8 and node["resources"][MI250] == 1
    assert node["min_workers"] == node["max_workers"] == len(cfg["provider"]["worker_ips"]) == cfg["max_workers"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "/opt/raytune_llama" in c for c in cfg[key]), key
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and "--num-gpus=8" in start[0] and MI250 in start[0] and "--metrics-export-port" in start[0]


def test_launcher_yaml_rocm_settings():
    cfg = launcher()
    docker = cfg["docker"]
    assert docker["image"].startswith("rocm/pytorch:")
    opts = " ".join(docker["run_options"])
    for needed in ("/dev/kfd", "/dev/dri", "--group-add=video", "--ipc=host", "/mnt/shared",
                   "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES=1", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH="):
        assert needed in opts, needed
    # Ray sets the visible-devices variable per worker; a global value would fight it.
    assert not re.search(r"-e (HIP|ROCR|CUDA)_VISIBLE_DEVICES=", opts)
    token_dir = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)/auth_token", opts).group(1)
    assert token_dir in cfg["file_mounts"], token_dir
    dockerfile = (CLUSTER / "Dockerfile.rocm").read_text()
    assert f"FROM {docker['image']}" in dockerfile  # K8s pods and ray up run the same ROCm base


def test_plan_reads_the_launcher_yaml(capsys):
    rc = main(["plan", "--cluster", str(CLUSTER / "mi250.yaml"), "--model", "llama3-70b",
               "--seq-len", "1024", "--global-batch", "512", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"] == {"nodes": 8, "devices_per_node": 8, "world_size": 64, "hardware": "mi250"}
    main(["plan", "--cluster", str(CLUSTER / "mi250.yaml"), "--model", "llama3-70b",
          "--seq-len", "1024", "--global-batch", "512"])
    assert "on 8 x 8 mi250 (64 devices)" in capsys.readouterr().out


def test_kuberay_raycluster_manifest():
    (pvc,) = k8s_docs("kuberay-shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    (rc,) = k8s_docs("kuberay-mi250.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    assert rc["spec"]["rayVersion"] == ray.__version__
    assert rc["spec"]["authOptions"]["mode"] == "token"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["template"]["spec"]["containers"][0]["image"]
    workers = rc["spec"]["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert int(limits["amd.com/gpu"]) == 8 == int(group["rayStartParams"]["num-gpus"])
        assert MI250 in group["rayStartParams"]["resources"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES") == "1"
        assert not {"HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} & set(env)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]


def test_kuberay_rayjob_runs_finetune_with_a_valid_config():
    (job,) = k8s_docs("kuberay-rayjob-mi250.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    (rc,) = k8s_docs("kuberay-mi250.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["raytune-llama", "finetune"]
    # The image holds the repository at /opt/raytune_llama (cluster/Dockerfile.rocm).
    config = ROOT / Path(entry[2]).relative_to("/opt/raytune_llama")
    assert config.is_file()


def test_every_cluster_yaml_is_checked_here():
    checked = {"mi250.yaml", "kuberay-mi250.yaml", "kuberay-shared-pvc.yaml", "kuberay-rayjob-mi250.yaml"}
    assert {p.name for p in CLUSTER.glob("*.yaml")} == checked


@pytest.mark.parametrize("path", ["examples/configs/llama3_70b_mi250.yaml"])
def test_70b_run_config_validates(path):
    cfg = load_config(ROOT / path).validate(check_files=False)
    assert cfg.parallel.use_gpu and cfg.parallel.num_workers == 64
    assert cfg.run.storage_path.startswith("/mnt/shared")  # checkpoints on the volume every node shares


def test_grafana_dashboard_queries_the_exported_metrics():
    dash = json.loads((CLUSTER / "grafana" / "raytune_llama.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert dash["panels"]
    exported = {prometheus_name(k) for k in METRICS}
    used = set()
    for panel in dash["panels"]:
        assert panel["title"] and panel["datasource"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = set(re.findall(r"\bray_raytune_\w+", expr))
            assert names and names <= exported, (panel["title"], names - exported)
            used |= names
    assert used == exported, f"metrics with no panel: {sorted(exported - used)}"
