"""Deployment files: the KubeRay manifests against the vendored KubeRay v1 CRD schemas (misspelt fields fail),
cluster.yaml through Ray's own cluster-config validation, and the Ray / torch pins agreeing everywhere."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from pipelines.config import RerankJobConfig, ServeAppConfig, validate_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY = ROOT / "conf" / "kuberay"


def strict(schema: Any) -> Any:
    """additionalProperties: false on every object schema that lists properties and does not keep unknown fields,
    so a misspelt field is an error (the API server would silently drop it)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    with gzip.open(SCHEMAS / f"{kind}.v1.json.gz", "rt") as f:
        schema = json.load(f)["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


def documents(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        m = re.fullmatch(r"(ray|torch)(\[[^\]]*\])?==([0-9.]+)", dep.replace(" ", ""))
        if m:
            found[m.group(1)] = m.group(3)
    assert set(found) == {"ray", "torch"}, f"pyproject.toml must pin ray and torch exactly: {deps}"
    return found


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return documents(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return documents(KUBERAY / "rayservice.yaml")


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_matches_the_crd_and_retries_with_resume(rayjob):
    job = rayjob["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert errors(crd_validator("rayjob"), job) == []
    spec = job["spec"]
    assert spec["backoffLimit"] > 0
    assert spec["entrypoint"].split()[:2] == ["rerank", "run"] and "--resume" in spec["entrypoint"].split()
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert any(
        g["maxReplicas"] > g["minReplicas"]
        and g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in workers
    )
    # The job's config: valid, its output on S3 (a retry's new cluster finds it there), mounted where the
    # entrypoint reads it.
    config_map = rayjob["ConfigMap"]
    path = spec["entrypoint"].split()[2]
    mounts = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(path == f"{m['mountPath']}/job.yaml" for m in mounts)
    config = validate_config(RerankJobConfig, yaml.safe_load(config_map["data"]["job.yaml"]), "rayjob.yaml")
    assert config.output.uri.startswith("s3://") and config.input.uri.startswith("s3://")


def test_rayservice_matches_the_crd_with_the_api_key_from_a_secret(rayservice):
    from ray.serve.schema import ServeDeploySchema

    svc = rayservice["RayService"]
    assert errors(crd_validator("rayservice"), svc) == []
    spec = svc["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema of a config file
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pipelines.serve:build_app"
    config = validate_config(ServeAppConfig, app["args"], "serveConfigV2")
    assert config.serve.num_gpus_per_replica == 1 and config.serve.autoscaling is not None
    assert config.serve.autoscaling.max_replicas > config.serve.autoscaling.min_replicas
    cluster = spec["rayClusterConfig"]
    for c in containers(cluster):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RERANK_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "rerank-api-key", c["name"]
    assert any(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["workerGroupSpecs"]
    )


@pytest.mark.parametrize(
    "kind, edit, expected",
    [
        ("rayjob", lambda d: d["spec"].update(backofLimit=3), "'backofLimit' was unexpected"),
        (
            "rayjob",
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=3),
            "'maxReplica' was unexpected",
        ),
        (
            "rayservice",
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicyy="Always"
            ),
            "'imagePullPolicyy' was unexpected",
        ),
        ("rayservice", lambda d: d["spec"].update(serveConfigV2={"applications": []}), "is not of type 'string'"),
    ],
)
def test_a_misspelt_field_fails(rayjob, rayservice, kind, edit, expected):
    doc = copy.deepcopy((rayjob if kind == "rayjob" else rayservice)["RayJob" if kind == "rayjob" else "RayService"])
    edit(doc)
    found = errors(crd_validator(kind), doc)
    assert any(expected in e for e in found), found


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler._private.util import validate_config as ray_validate

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    ray_validate(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before it touches the cloud
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        ray_validate(prepare_config(bad))


def _image_tags() -> list[tuple[str, str]]:
    """(where, image) for every image the cluster files run."""
    out = []
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("image", "head_image", "worker_image"):
        if key in cluster.get("docker", {}):
            out.append((f"cluster.yaml docker.{key}", cluster["docker"][key]))
    for name, kind, key in (
        ("rayjob.yaml", "RayJob", "rayClusterSpec"),
        ("rayservice.yaml", "RayService", "rayClusterConfig"),
    ):
        spec = documents(KUBERAY / name)[kind]["spec"][key]
        out += [(f"{name} {c['name']}", c["image"]) for c in containers(spec)]
    return out


def test_versions_agree_everywhere():
    import ray

    pinned = pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ray.__version__ == pinned["ray"], "the installed Ray is not the pinned one"
    docker = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", docker, re.MULTILINE))
    assert args["RAY_VERSION"] == pinned["ray"] and args["TORCH_VERSION"] == pinned["torch"]
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}-\$\{VARIANT\}$", docker, re.MULTILINE)
    tags = _image_tags()
    assert len(tags) >= 6
    for where, image in tags:
        assert re.fullmatch(rf".+/rerank:{re.escape(project)}-ray{re.escape(pinned['ray'])}-(cpu|gpu)", image), (
            where,
            image,
        )
    for name, kind, key in (
        ("rayjob.yaml", "RayJob", "rayClusterSpec"),
        ("rayservice.yaml", "RayService", "rayClusterConfig"),
    ):
        assert documents(KUBERAY / name)[kind]["spec"][key]["rayVersion"] == pinned["ray"], name
    # GPU nodes run the CUDA image, the CPU-only head the CPU one.
    assert all(image.endswith("-gpu") == ("worker" in where or "gpu" in where) for where, image in tags), tags


def test_serve_deploy_file_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load((ROOT / "conf" / "serve_deploy.yaml").read_text())
    ServeDeploySchema.model_validate(conf)
    validate_config(ServeAppConfig, conf["applications"][0]["args"], "conf/serve_deploy.yaml")
