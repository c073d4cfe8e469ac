"""The cluster files: each launcher config passes what `ray up` checks first, offline.

`ray up` runs ray.autoscaler._private.util.prepare_config (merge with the provider's defaults) and
then validate_config (Ray's JSON schema plus a few cross-field rules) before it talks to any cloud
(autoscaler/_private/commands.py, _bootstrap_config). We run the same two calls; no AWS needed. The
KubeRay manifest has no validator in Ray, so its structure is checked by hand.
"""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ["cluster.yaml", "clusters/onprem.yaml"]
KUBERAY_MANIFEST = ROOT / "clusters" / "kuberay-rayjob.yaml"
FFCV_SYSTEM_LIBS = ["libturbojpeg0-dev", "libopencv-dev", "pkg-config", "build-essential"]


def load(relative_path: str) -> dict:
    return yaml.safe_load((ROOT / relative_path).read_text())


def ray_up_checks(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def all_commands(config: dict) -> str:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return "\n".join(cmd for key in keys for cmd in config.get(key, []))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_up_validation(path):
    prepared = ray_up_checks(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_launcher_config_keeps_auth_on_and_dashboard_private(path):
    config = load(path)
    commands = all_commands(config)
    run_options = " ".join(config.get("docker", {}).get("run_options", []))
    assert "RAY_AUTH_MODE=token" in commands + run_options
    assert any(target.endswith(".ray/auth_token") for target in config["file_mounts"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "TRAIN_DRIVER" in head_start + str(config.get("available_node_types", {}))


def test_aws_config_shape():
    config = load("cluster.yaml")
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["TRAIN_DRIVER"] >= 1
    assert "InstanceMarketOptions" not in nodes[config["head_node_type"]]["node_config"]   # on-demand head
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert "InstanceMarketOptions" not in gpu["node_config"]                               # on-demand GPUs
    spot = nodes["gpu_spot_worker"]                                                        # and spot ones beside
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot["resources"] == gpu["resources"] and spot["min_workers"] == 0
    assert {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"} == gpu["node_config"]
    setup = " ".join(config["setup_commands"])
    assert all(lib in setup for lib in FFCV_SYSTEM_LIBS)
    assert "pip install -q -e /home/ray/raytransfer" in setup
    assert "aws s3 sync" in setup and "/mnt/betons" in setup
    assert config["file_mounts"]["/home/ray/raytransfer"] == "."


def test_typo_is_rejected():
    # The test can fail: a misspelt key is refused by the schema, as `ray up` would refuse it.
    config = load("cluster.yaml")
    gpu = config["available_node_types"]["gpu_worker"]
    gpu["min_wokers"] = gpu.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        ray_up_checks(config)


def test_unknown_top_level_key_is_rejected():
    config = load("clusters/onprem.yaml")
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        ray_up_checks(config)


def test_kuberay_rayjob_structure():
    job = yaml.safe_load(KUBERAY_MANIFEST.read_text())
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["python", "sweeps/full_paper.py"]
    assert entrypoint[entrypoint.index("--storage") + 1].startswith("s3://")
    assert "--data" in entrypoint and "--scale" in entrypoint
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    assert "TRAIN_DRIVER" in cluster["headGroupSpec"]["rayStartParams"]["resources"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0
        assert group["maxReplicas"] >= 1
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in gpu_groups]:
        assert all("2.60.0" in c["image"] for c in pod["containers"])
        assert any("/mnt/betons" == m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"])
