"""The cluster files are well formed: every YAML parses, the Ray cluster launcher config validates against
Ray's own schema, the KubeRay manifests against KubeRay's CRDs (when they are at hand), and every shell
script passes shellcheck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

YAML_FILES = sorted(p for pattern in ("cluster/**/*.yaml", "configs/*.yaml") for p in REPO.glob(pattern))
SHELL_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("cluster/**/*.sh"), *REPO.glob("cluster/**/*.sbatch")])
# KubeRay's CRDs (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml from ray-operator/config/crd/bases) are not
# on PyPI; point KUBERAY_CRD_DIR at a copy to validate the manifests against them.
CRD_DIR = os.environ.get("KUBERAY_CRD_DIR")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


def test_aws_cluster_config_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster/aws/ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu_types = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)  # autoscaling bounds


def kuberay_documents() -> list[dict]:
    docs = [d for name in ("raycluster.yaml", "rayjob.yaml")
            for d in yaml.safe_load_all((REPO / "cluster/kuberay" / name).read_text())]
    return [d for d in docs if d["apiVersion"] == "ray.io/v1"]


def test_kuberay_manifests_have_gpu_workers_token_auth_and_shared_storage():
    cluster, job = kuberay_documents()
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        for group in spec["workerGroupSpecs"]:
            container = group["template"]["spec"]["containers"][0]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
            assert "/mnt/runs" in [m["mountPath"] for m in container["volumeMounts"]]
    assert "ray.shared_storage=true" in job["spec"]["entrypoint"]


@pytest.mark.skipif(not CRD_DIR, reason="KubeRay CRDs not available offline (set KUBERAY_CRD_DIR to validate)")
def test_kuberay_manifests_match_the_crds():
    for document in kuberay_documents():
        crd = yaml.safe_load((Path(CRD_DIR) / f"ray.io_{document['kind'].lower()}s.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        jsonschema.validate(document, version["schema"]["openAPIV3Schema"])


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_passes_shellcheck(path):
    result = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
