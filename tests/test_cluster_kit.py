"""The cluster/ deployment kit: checked against the real tools that will consume it.

- the Ray launcher config against the JSON schema inside the installed `ray` package, then
  through Ray's own preparation and validation (what `ray up` runs before touching a cloud);
  every node type has an instance role whose IAM policy (cluster/aws/iam/) covers the bucket,
  prefixes and image the kit uses, and nothing wider; the registry login precedes the pull;
  the setup's Ray-token guard runs for real;
- the KubeRay manifests for the fields KubeRay needs, GPU requests that add up to the
  entrypoint's `--workers`, and an entrypoint that the real `train` command accepts; token
  authentication on every Ray container and on the job submitter, with the installed Ray given
  each container's environment switching token authentication on and accepting only the
  Secret's token; the NetworkPolicy evaluated for who reaches which port; no wildcard bind
  beyond what pod networking needs;
- the Dockerfile: its build context and COPY/RUN steps produce the same package the tests
  run (a wheel is really built from exactly what the image would receive), with the tested
  constraints, plus what KubeRay's probes run;
- the team MLflow server script: a real server that refuses anonymous requests.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from helpers import BIN, free_port, stop_session

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "cluster"
LAUNCHER = KIT / "aws" / "ray-cluster.yaml"
IAM = KIT / "aws" / "iam"
K8S = KIT / "kubernetes"
README = KIT / "README.md"

# The options `sr-pipeline train` has per the train issue; used only while the command is not
# registered yet (then the real command's options are used instead).
TRAIN_OPTIONS_PLANNED = {
    "--shards", "--scale", "--preset", "--workers", "--gpus-per-worker", "--cpus-per-worker",
    "--address", "--storage-path", "--run-name", "--max-failures", "--tracking-uri", "--experiment",
    "--cpu", "--resume", "--epochs", "--iters-per-epoch", "--batch-size", "--lr", "--patch-size",
}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_bundled_schema() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before any cloud call: merge the provider defaults, then Ray's own
    # semantic checks (head type exists, worker bounds consistent, docker section sane).
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_launcher_has_a_cpu_head_and_gpu_workers_adding_up_to_8() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU instance
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    assert sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_types.values()) == 8
    for t in gpu_types.values():
        assert t["min_workers"] == t["max_workers"], "DDP wants a fixed set of GPUs"
        assert t["resources"]["GPU"] > 1, "multi-GPU nodes (e.g. 2 x 4 GPUs)"
    assert config["max_workers"] >= sum(t["min_workers"] for t in types.values() if "min_workers" in t)
    # The head's Ray start command agrees with its declared resources and keeps the dashboard private.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in LAUNCHER.read_text()


def _install_env_wrapper(config: dict, home: Path, env_text: str) -> dict[str, str]:
    """Run the launcher's first setup command (it installs `sr-train-env`) for real, under a
    scratch HOME holding `env_text` as the mounted environment file; returns the environment
    in which `sr-train-env` is then on PATH."""
    env_target = next(iter(config["file_mounts"]))
    (home / "bin").mkdir(parents=True, exist_ok=True)
    (home / Path(env_target).name).write_text(env_text)
    install = config["setup_commands"][0].replace("/usr/local/bin/", str(home / "bin") + "/")
    env = {"HOME": str(home), "PATH": f"{home / 'bin'}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", install], check=True, env=env, timeout=30)
    return env


def test_launcher_runs_the_node_image_with_the_environment_every_node_needs(tmp_path: Path) -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["docker"]["image"].split("/")[-1].startswith("sr-pipeline:")
    env_target, env_source = next(iter(config["file_mounts"].items()))
    assert env_source == "./cluster/aws/cluster.env" and (KIT / ".gitignore").read_text().count("*.env")
    # Every `ray start` runs through the wrapper that loads the environment file, so the
    # Ray worker processes (training ranks) inherit it.
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "sr-train-env ray start" in cmd

    # Run the setup command that installs the wrapper, for real, against the example file.
    env = _install_env_wrapper(config, tmp_path / "home", (KIT / "node.env.example").read_text())
    out = subprocess.run(
        ["bash", "-c", f"sr-train-env {sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'"],
        check=True, env=env, capture_output=True, text=True, timeout=30,
    )
    seen = json.loads(out.stdout)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "SR_SHARDS_URI", "SR_STORAGE_PATH"):
        assert seen.get(var), f"{var} does not reach processes started by sr-train-env"
    assert seen["SR_STORAGE_PATH"].startswith("s3://"), "checkpoints must be on shared storage"
    assert seen["MLFLOW_TRACKING_URI"].startswith("https://"), "a team server behind TLS"
    # The shard copy uses the variable the environment file defines.
    assert any("$SR_SHARDS_URI" in c and "/data/shards" in c for c in config["setup_commands"])


def _env_file(text: str) -> dict[str, str]:
    return dict(
        ln.split("=", 1) for ln in (x.strip() for x in text.splitlines())
        if ln and not ln.startswith("#") and "=" in ln
    )


def _statements(name: str) -> list[dict]:
    doc = json.loads((IAM / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _allows(statements: list[dict], action: str, resource: str) -> bool:
    """Whether an Allow statement grants `action` on `resource` (IAM wildcards, no conditions)."""
    return any(
        s["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action, a) for a in _as_list(s["Action"]))
        and any(fnmatch.fnmatchcase(resource, r) for r in _as_list(s["Resource"]))
        for s in statements
    )


def test_launcher_nodes_have_least_privilege_instance_roles_and_pull_the_image() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    region = config["provider"]["region"]
    image = config["docker"]["image"]
    registry, _, repo_tag = image.partition("/")
    account = registry.split(".")[0]
    assert re.fullmatch(rf"\d{{12}}\.dkr\.ecr\.{re.escape(region)}\.amazonaws\.com", registry), image
    repository = repo_tag.split(":")[0]

    # Every node type, workers included (Ray's launcher gives only the head a role by default),
    # runs with an instance profile of this account.
    profiles = {}
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        match = re.fullmatch(rf"arn:aws:iam::{account}:instance-profile/([\w+=,.@-]+)", arn)
        assert match, f"node type {name} has no instance profile of account {account}: {arn!r}"
        profiles[name] = match.group(1)
    head_profile = profiles.pop(config["head_node_type"])
    worker_profiles = set(profiles.values())
    assert worker_profiles and head_profile not in worker_profiles, "workers must not get the head's EC2 rights"

    # The node policy covers exactly what a node does: read the shards, read/write checkpoints,
    # pull the image; nothing wider.
    node = _statements("node-policy.json")
    env = _env_file((KIT / "node.env.example").read_text())
    shards, storage = env["SR_SHARDS_URI"], env["SR_STORAGE_PATH"]
    for uri in (shards, storage):
        bucket = uri.removeprefix("s3://").split("/")[0]
        assert _allows(node, "s3:ListBucket", f"arn:aws:s3:::{bucket}")
    shard_obj = f"arn:aws:s3:::{shards.removeprefix('s3://')}/manifest.json"
    ckpt_obj = f"arn:aws:s3:::{storage.removeprefix('s3://')}/run/checkpoint_000001/model.pt"
    assert _allows(node, "s3:GetObject", shard_obj)
    assert not _allows(node, "s3:PutObject", shard_obj), "the nodes must not overwrite the shards"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert _allows(node, action, ckpt_obj), action
    assert not _allows(node, "s3:GetObject", f"arn:aws:s3:::{storage.split('/')[2]}/private/x")
    assert not _allows(node, "s3:GetObject", "arn:aws:s3:::another-bucket/x")
    repo_arn = f"arn:aws:ecr:{region}:{account}:repository/{repository}"
    for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
        assert _allows(node, action, repo_arn), action
        assert not _allows(node, action, f"arn:aws:ecr:{region}:{account}:repository/other")
    assert not _allows(node, "ecr:PutImage", repo_arn), "nodes pull, never push"
    assert _allows(node, "ecr:GetAuthorizationToken", "*")
    for statements in (node, _statements("head-policy.json")):
        for s in statements:
            assert all("*" not in a.split(":")[0] and a.split(":")[1] != "*" for a in _as_list(s["Action"])), s
            if "*" in _as_list(s["Resource"]):
                # Only actions that have no resource-level permissions, or are tied down by a condition.
                assert all(a in {"ecr:GetAuthorizationToken", "ec2:Describe*"} for a in _as_list(s["Action"])) \
                    or s.get("Condition"), s

    # The head additionally launches and ends only this cluster's workers and hands them only
    # the worker role.
    head = _statements("head-policy.json")
    worker_role = f"arn:aws:iam::{account}:role/{next(iter(worker_profiles))}"
    assert _allows(head, "iam:PassRole", worker_role)
    assert not _allows(head, "iam:PassRole", f"arn:aws:iam::{account}:role/admin")
    terminate = [s for s in head if "ec2:TerminateInstances" in _as_list(s["Action"])]
    assert terminate and all(
        s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == config["cluster_name"] for s in terminate
    )
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    assert TAG_RAY_CLUSTER_NAME == "ray-cluster-name"
    trust = _statements("ec2-trust.json")
    assert [s["Principal"] for s in trust] == [{"Service": "ec2.amazonaws.com"}]

    # Docker on each host logs in to that registry, with the node's role, before the pull; the
    # password goes through a pipe, never onto a command line.
    login = " ".join(config.get("initialization_commands", []))
    assert re.search(rf"ecr get-login-password --region {region}\s*\|\s*docker login --username AWS "
                     rf"--password-stdin {re.escape(registry)}(\s|$)", login), login
    assert config["docker"].get("pull_before_run") is True
    readme = README.read_text()
    for name in ("node-policy.json", "head-policy.json", "ec2-trust.json", "IamInstanceProfile"):
        assert name in readme, name


def test_launcher_refuses_to_start_ray_without_a_real_token(tmp_path: Path) -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    guard = [c for c in config["setup_commands"] if "RAY_AUTH_TOKEN" in c]
    assert len(guard) == 1, "one setup command checks the Ray token"
    example = (KIT / "node.env.example").read_text()
    good = re.sub(r"(?m)^RAY_AUTH_TOKEN=.*$", f"RAY_AUTH_TOKEN={secrets.token_hex(32)}", example)
    cases = {
        "placeholder": (example, False),
        "real token": (good, True),
        "no auth mode": (re.sub(r"(?m)^RAY_AUTH_MODE=.*$", "", good), False),
        "short token": (re.sub(r"(?m)^RAY_AUTH_TOKEN=.*$", "RAY_AUTH_TOKEN=abc", good), False),
    }
    for case, (text, ok) in cases.items():
        env = _install_env_wrapper(config, tmp_path / case.replace(" ", "-"), text)
        proc = subprocess.run(["bash", "-c", guard[0]], env=env, capture_output=True, text=True, timeout=30)
        assert (proc.returncode == 0) == ok, (case, proc.stderr)
        if not ok:
            assert "RAY_AUTH_TOKEN" in proc.stderr


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------


def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _train_options() -> set[str]:
    """Options of the real `sr-pipeline train` when registered, else the planned ones."""
    import typer.main

    from pipeline.cli import app

    group = typer.main.get_command(app)
    command = group.commands.get("train") if hasattr(group, "commands") else None
    if command is None:
        return TRAIN_OPTIONS_PLANNED
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _parse_options(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        assert argv[i].startswith("--"), f"unexpected argument {argv[i]!r}"
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i]] = argv[i + 1]
            i += 2
        else:
            out[argv[i]] = None
            i += 1
    return out


def test_kuberay_raycluster_has_gpu_worker_groups() -> None:
    cluster = _one(K8S / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        worker = group["template"]["spec"]["containers"][0]
        limits = worker["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) > 0
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        shm = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    assert gpus == 8


def test_kuberay_rayjob_trains_on_all_gpus_with_object_storage() -> None:
    job = _one(K8S / "rayjob.yaml", "RayJob")
    cluster = _one(K8S / "raycluster.yaml", "RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    # One cluster definition: the job's own cluster is exactly the RayCluster's spec.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["sr-pipeline", "train"]
    options = _parse_options(argv[2:])
    unknown = set(options) - _train_options()
    assert not unknown, f"entrypoint options that `sr-pipeline train` lacks: {sorted(unknown)}"
    assert options["--workers"] == "8"
    assert options["--storage-path"].startswith("s3://")
    assert options["--run-name"], "a fixed run name makes re-applying the job resume"
    assert int(options["--max-failures"]) >= 1

    # The GPUs asked for by the entrypoint are exactly what the worker groups offer, and the
    # CPUs per rank fit into each pod.
    workers, gpus_per = int(options["--workers"]), float(options.get("--gpus-per-worker") or 1)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    offered = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups)
    assert workers * gpus_per == offered
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        ranks_per_pod = int(limits["nvidia.com/gpu"]) / gpus_per
        assert ranks_per_pod * float(options["--cpus-per-worker"]) <= _cpu(limits["cpu"])


def test_kuberay_pods_share_one_image_config_and_the_docker_ray_version() -> None:
    cluster = _one(K8S / "raycluster.yaml", "RayCluster")
    config = {d["kind"]: d for d in _docs(K8S / "config.yaml")}
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    images = {c["image"] for t in templates for c in _containers(t)}
    assert len(images) == 1 and next(iter(images)).split("/")[-1].startswith("sr-pipeline:")
    for t in templates:
        assert t["spec"]["serviceAccountName"] == config["ServiceAccount"]["metadata"]["name"]
        main = t["spec"]["containers"][0]
        refs = {(k, v["name"]) for e in main["envFrom"] for k, v in e.items()}
        assert refs == {("configMapRef", config["ConfigMap"]["metadata"]["name"]),
                        ("secretRef", config["Secret"]["metadata"]["name"])}
        assert any(m["mountPath"] == "/data" for m in main["volumeMounts"])
    env = config["ConfigMap"]["data"]
    for var in ("MLFLOW_TRACKING_URI", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "SR_SHARDS_URI"):
        assert env.get(var), var
    assert all(isinstance(v, str) for v in env.values()), "ConfigMap values must be strings"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(config["Secret"]["stringData"])
    assert "PASSWORD" not in " ".join(env), "credentials belong in the Secret"
    assert cluster["spec"]["rayVersion"] == _dockerfile_args(KIT / "Dockerfile")["RAY_VERSION"]


def test_team_tracking_server_manifest_is_never_exposed_bare() -> None:
    docs = {d["kind"]: d for d in _docs(K8S / "mlflow.yaml")}
    assert docs["Service"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split("/")[-1].startswith("sr-pipeline-mlflow:")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_ALLOWED_HOSTS"]
    assert {e["secretRef"]["name"] for e in container["envFrom"]} == {"mlflow-server"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    mlflow_dockerfile = (KIT / "mlflow" / "Dockerfile").read_text()
    assert "mlflow[auth]==" in mlflow_dockerfile and "mlflow-server.sh" in mlflow_dockerfile


def _ray_pod_templates(path: Path) -> list[dict]:
    """Head and worker pod templates of the RayCluster spec in `path` (RayCluster or RayJob)."""
    doc = _docs(path)[0]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _env_vars(container: dict, secret_values: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's `env` as the kubelet would resolve it (secretKeyRef from `secret_values`)."""
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secret_values[(ref["name"], ref["key"])]
    return out


def test_every_kuberay_ray_container_and_the_submitter_use_token_auth(tmp_path: Path) -> None:
    job = _one(K8S / "rayjob.yaml", "RayJob")
    secret, token = None, secrets.token_hex(32)
    containers = []
    for path in (K8S / "raycluster.yaml", K8S / "rayjob.yaml"):
        doc = _docs(path)[0]
        auth = (doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"])["authOptions"]
        assert auth["mode"] == "token"
        secret = secret or auth["secretName"]
        assert auth["secretName"] == secret, "one token for every cluster of the kit"
        containers += [(path.name, t["spec"]["containers"][0]) for t in _ray_pod_templates(path)]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert submitter, "the RayJob submitter must be defined to carry the token"
    containers += [("rayjob.yaml submitter", c) for c in submitter]
    assert len(containers) == 5  # head + worker group, twice, + the submitter
    for where, container in containers:
        env = container.get("env", [])
        names = {e["name"]: e for e in env}
        assert names.get("RAY_AUTH_MODE", {}).get("value") == "token", (where, container["name"])
        ref = names.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert ref == {"name": secret, "key": "auth_token"}, (where, container["name"])
    # The Secret is created by hand (README), never committed with a value.
    assert not any(d.get("kind") == "Secret" and d["metadata"]["name"] == secret for d in _docs(K8S / "config.yaml"))
    assert f"create secret generic -n sr-pipeline {secret}" in README.read_text()

    # The installed Ray (the version the image pins) really switches token authentication on
    # from exactly this environment, and accepts the Secret's token and nothing else.
    probe = (
        "import json, sys\n"
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled, validate_request_token\n"
        "token = sys.argv[1]\n"
        "print(json.dumps([is_token_auth_enabled(), validate_request_token('Bearer ' + token),"
        " validate_request_token('Bearer ' + token[::-1]), validate_request_token('')]))\n"
    )
    seen = set()
    for _, container in containers:
        env = _env_vars(container, {(secret, "auth_token"): token})
        key = tuple(sorted(env.items()))
        if key in seen:
            continue
        seen.add(key)
        out = subprocess.run(
            [sys.executable, "-c", probe, token], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
            check=True, capture_output=True, text=True, timeout=120,
        )
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, False, False]
    # Without these variables the same Ray runs unauthenticated: the check above can fail.
    out = subprocess.run(
        [sys.executable, "-c", probe, token], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=True, capture_output=True, text=True, timeout=120,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])[0] is False
    # The README says which Ray and KubeRay versions brought the variables and fields used.
    readme = README.read_text()
    assert "Ray 2.52.0" in readme and "KubeRay v1.5.1" in readme and "v1.6.0" in readme
    from packaging.version import Version

    assert Version(version("ray")) >= Version("2.52.0")


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policy: dict, pod: dict[str, str], source: dict[str, str], source_ns: str, port: int) -> bool:
    """Kubernetes NetworkPolicy ingress semantics for one policy in namespace `sr-pipeline`:
    does traffic from pod `source` (labels) in namespace `source_ns` reach `port` of `pod`?"""
    spec = policy["spec"]
    if not _selects(spec["podSelector"], pod):
        return True  # not isolated by this policy
    assert "Ingress" in spec["policyTypes"]
    ns_labels = {"kubernetes.io/metadata.name": source_ns}
    for rule in spec.get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "no address-based exceptions"
            if "namespaceSelector" in peer:
                ok = _selects(peer["namespaceSelector"], ns_labels) and _selects(peer.get("podSelector", {}), source)
            else:
                ok = source_ns == "sr-pipeline" and _selects(peer["podSelector"], source)
            if ok:
                return True
    return False


def test_network_policy_keeps_the_head_ports_to_the_clusters_own_pods() -> None:
    policy = _one(K8S / "config.yaml", "NetworkPolicy")
    job = _one(K8S / "rayjob.yaml", "RayJob")
    ray_pods = [t["metadata"]["labels"] for p in (K8S / "raycluster.yaml", K8S / "rayjob.yaml")
                for t in _ray_pod_templates(p)]
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    mlflow_pod = _one(K8S / "mlflow.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    head_ports = (6379, 8265, 10001)
    for pod in ray_pods:
        assert _selects(policy["spec"]["podSelector"], pod), "every Ray pod is isolated by the policy"
        for port in (*head_ports, 52365, 8080, 12345):  # + agent, metrics, a dynamic worker port
            assert _admits(policy, pod, ray_pods[0], "sr-pipeline", port), port
            assert not _admits(policy, pod, mlflow_pod, "sr-pipeline", port), port
            assert not _admits(policy, pod, {"app": "anything"}, "sr-pipeline", port), port
            assert not _admits(policy, pod, ray_pods[0], "other-team", port), port
            assert not _admits(policy, pod, operator, "sr-pipeline", port), port
        # Job submission and KubeRay's status calls: the dashboard port, nothing else.
        assert _admits(policy, pod, submitter, "sr-pipeline", 8265)
        assert _admits(policy, pod, operator, "kuberay-system", 8265)
        for port in (6379, 10001):
            assert not _admits(policy, pod, submitter, "sr-pipeline", port)
            assert not _admits(policy, pod, operator, "kuberay-system", port)
    # The submitter is not itself a Ray pod (it must not get the Ray-to-Ray rule).
    assert not _selects(policy["spec"]["podSelector"], submitter)
    assert "NetworkPolicy" in README.read_text()


def _keys(node: object) -> set[str]:
    """Every mapping key anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_nothing_binds_a_wildcard_address_beyond_pod_networking() -> None:
    # Kubernetes: no host networking or host ports, only ClusterIP Services, no Ingress; then
    # every 0.0.0.0 is a pod-internal bind behind such a Service, and only where it is needed.
    allowed = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = _docs(path)
        text = path.read_text()
        assert not _keys(docs) & {"hostNetwork", "hostPort", "hostIPC", "hostPID"}, path.name
        assert not any(d["kind"] == "Ingress" for d in docs), path.name
        for d in docs:
            if d["kind"] == "Service":
                assert d["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
            if d["kind"] in {"RayCluster", "RayJob"}:
                spec = d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
                head = spec["headGroupSpec"]
                assert head.get("serviceType", "ClusterIP") == "ClusterIP"
                for key, value in head["rayStartParams"].items():
                    if value == "0.0.0.0":
                        assert key == "dashboard-host", f"{path.name}: {key} binds every address"
                        allowed[path.name] = allowed.get(path.name, 0) + 1
                for g in spec["workerGroupSpecs"]:
                    assert "0.0.0.0" not in json.dumps(g["rayStartParams"])
            if d["kind"] == "Deployment":
                for c in d["spec"]["template"]["spec"]["containers"]:
                    for e in c.get("env", []):
                        if e.get("value") == "0.0.0.0":
                            assert e["name"] == "MLFLOW_HOST"  # behind mlflow.yaml's ClusterIP Service
                            allowed[path.name] = allowed.get(path.name, 0) + 1
        assert text.count("0.0.0.0") == allowed.get(path.name, 0), f"{path.name}: an unexplained 0.0.0.0"
    # Everything else in the kit binds loopback (or says nothing): the VM launcher's dashboard
    # on 127.0.0.1 is checked in test_launcher_has_a_cpu_head_and_gpu_workers_adding_up_to_8.
    for path in [LAUNCHER, KIT / "Dockerfile", KIT / "node.env.example", *sorted((KIT / "mlflow").iterdir())]:
        assert "0.0.0.0" not in path.read_text(), path
    assert "EXPOSE" not in {word for word, _ in _instructions(KIT / "Dockerfile")}


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return out


def _dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex on slash-separated relative paths."""
    pat = pattern.strip("/")
    prefix = ""
    if pat.startswith("**/"):
        prefix, pat = "(?:.*/)?", pat[3:]
    body = "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in pat)
    return re.compile(prefix + body)


def _dockerignore_filter(root: Path, patterns: list[str]) -> list[Path]:
    """Files of the build context under Docker's .dockerignore rules: the last matching
    pattern wins, `!` re-includes, and a match on a directory covers what is inside it."""
    rules = [(p.startswith("!"), _ignore_regex(p.lstrip("!"))) for p in patterns]
    negated = [p.lstrip("!").strip("/") for p in patterns if p.startswith("!")]

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        out = False
        for negate, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                out = not negate
        return out

    kept = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Do not descend into excluded directories that no `!` pattern reaches into
        # (e.g. a 2 GB .venv).
        dirnames[:] = [
            d for d in dirnames
            if not excluded(rel_dir + d) or any(n.startswith(rel_dir + d) for n in negated)
        ]
        kept += [Path(dirpath) / f for f in filenames if not excluded(rel_dir + f)]
    return kept


def test_dockerfile_is_a_cuda_pytorch_image_with_the_tested_versions() -> None:
    args = _dockerfile_args(KIT / "Dockerfile")
    steps = _instructions(KIT / "Dockerfile")
    assert steps[0][0] == "ARG" and steps[1] == ("FROM", "${BASE_IMAGE}")
    base = args["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", base)
    assert match, f"not a CUDA PyTorch runtime image: {base}"
    makefile_torch = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert makefile_torch and match.group(1) == makefile_torch.group(1), "torch of the image != torch the tests use"
    # Ray pinned in the image satisfies the project's own requirement.
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    ray_req = next(Requirement(r) for r in requires("sr-pipeline") if Requirement(r).name == "ray")
    assert ray_req.specifier.contains(args["RAY_VERSION"])


def test_dockerfile_installs_the_same_package_the_tests_install(tmp_path: Path) -> None:
    steps = _instructions(KIT / "Dockerfile")
    workdir = next(rest for word, rest in steps if word == "WORKDIR")
    copies = [shlex.split(rest) for word, rest in steps if word == "COPY"]
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    # The install is an editable install of the copied source tree (as Makefile's `pip install -e ".[dev]"`).
    assert any(re.search(r"pip install -e \.(\s|$)", r) for r in installs), installs
    assert "-e \".[dev]\"" in (REPO / "Makefile").read_text()

    # Reproduce what the image receives: the build context (repository root) filtered by the
    # Dockerfile's own ignore file, then the COPY steps into WORKDIR ...
    patterns = [
        ln.strip() for ln in (KIT / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    context = set(_dockerignore_filter(REPO, patterns))
    image = tmp_path / "image" / workdir.lstrip("/")
    for *sources, dest in copies:
        target = image / dest if dest not in {".", "./"} else image
        for source in sources:
            src = REPO / source
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            files = [p for p in files if p in context]
            assert files, f"COPY {source}: nothing of it is in the build context"
            for f in files:
                rel = f.name if src.is_file() else f.relative_to(src)
                out = (target / rel) if (dest.endswith("/") or src.is_dir() or len(sources) > 1) else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)

    # ... and build the package from it, as `pip install -e .` would.
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(image)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    installed = version("sr-pipeline")
    assert wheel.name.startswith(f"sr_pipeline-{installed}-"), (wheel.name, installed)
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n for n in zf.namelist() if n.startswith("pipeline/")}
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    in_repo = {
        p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*")
        if p.is_file() and p.suffix in {".py", ".typed"} and "__pycache__" not in p.parts
    }
    assert in_repo <= in_wheel, f"missing from the image's package: {sorted(in_repo - in_wheel)}"
    assert "sr-pipeline = pipeline.cli:main" in entry_points
    # Nothing private rides along into the image.
    assert not any(p.relative_to(REPO).parts[0] in {".venv", "tests", ".git", "cluster"} for p in context)


def test_dockerfile_installs_the_tested_versions_and_what_kuberay_probes_run() -> None:
    steps = _instructions(KIT / "Dockerfile")
    installs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    assert installs
    for run in installs:
        for call in re.split(r"&&|;", run):
            if "pip install" in call:
                assert "-c constraints.txt" in call, f"pip install without the tested constraints: {call.strip()}"
    # constraints.txt reaches the image: copied into WORKDIR (where pip runs) and not ignored.
    copies = [shlex.split(rest) for word, rest in steps if word == "COPY"]
    assert any("constraints.txt" in c[:-1] and c[-1] in {".", "./"} for c in copies), copies
    patterns = [
        ln.strip() for ln in (KIT / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert REPO / "constraints.txt" in _dockerignore_filter(REPO, patterns)
    # The constraints agree with the image: the same Ray, and no torch pin to fight the base
    # image's CUDA build.
    pins = dict(
        ln.split("==", 1) for ln in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in ln and not ln.startswith("#")
    )
    pins = {k.lower(): v.strip() for k, v in pins.items()}
    assert pins["ray"] == _dockerfile_args(KIT / "Dockerfile")["RAY_VERSION"]
    assert "torch" not in pins

    # KubeRay's exec probes call wget: the image must have it.
    apt = [rest for word, rest in steps if word == "RUN" and "apt-get install" in rest]
    assert any("wget" in shlex.split(r) for r in apt), apt
    assert "wget" in README.read_text()


# ---------------------------------------------------------------------------------------------
# The team tracking server recipe, for real
# ---------------------------------------------------------------------------------------------


def _request(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


def test_team_server_script_refuses_a_directory_backend(tmp_path: Path) -> None:
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin", "MLFLOW_BACKEND_STORE_URI": f"file://{tmp_path}/mlruns",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a"), "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k", "MLFLOW_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run([str(KIT / "mlflow" / "mlflow-server.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: MLFLOW_BACKEND_STORE_URI must be a database, not a directory"
    ]
    del env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([str(KIT / "mlflow" / "mlflow-server.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in proc.stderr


def test_team_server_script_serves_only_authenticated_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    admin_password = "team-admin-" + os.urandom(6).hex()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
        "MLFLOW_STATE_DIR": str(tmp_path / "state"),
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(KIT / "mlflow" / "mlflow-server.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _request(f"{uri}/health") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "team server did not start"
            time.sleep(0.5)
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _request(api) == 401
        assert _request(f"{uri}/") == 401  # the UI too
        assert _request(api, ("admin", "wrong")) == 401
        assert _request(api, ("admin", admin_password)) == 200

        # sr-pipeline's start-up check treats it as reachable; a client with credentials logs.
        from mlflow.tracking import MlflowClient

        from pipeline import tracking

        tracking.check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("team-check")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "val/psnr", 30.5, step=1)
        assert client.get_metric_history(run.info.run_id, "val/psnr")[0].value == 30.5

        # Secrets: not on any command line; the generated auth config is private.
        ini = tmp_path / "state" / "basic_auth.ini"
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600
        assert stat.S_IMODE(ini.parent.stat().st_mode) == 0o700
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert admin_password.encode() not in cmdline
    finally:
        stop_session(proc)
        log.close()


# ---------------------------------------------------------------------------------------------
# The walk-through's commands exist
# ---------------------------------------------------------------------------------------------


def _readme_cli_calls(text: str) -> list[list[str]]:
    """`sr-pipeline SUB --opt ...` invocations in the shell blocks of a markdown file."""
    calls = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"(?<![\w-])sr-pipeline\s+([a-z][a-z-]*)(?=\s|$)([^'#|;&]*)", line):
                before = line[: match.start()].split()
                if before and before[-1].startswith("-") and before[-1] != "--":
                    continue  # an option's value (kubectl -n sr-pipeline ...), not the command
                calls.append([match.group(1), *match.group(2).split()])
    return calls


def test_cluster_walkthrough_uses_real_cli_options() -> None:
    import typer.main

    from pipeline.cli import app

    commands = typer.main.get_command(app).commands
    calls = _readme_cli_calls((KIT / "README.md").read_text())
    assert {c[0] for c in calls} >= {"ui", "info", "preprocess", "train", "evaluate"}
    for sub, *args in calls:
        if sub == "train" and sub not in commands:
            known = TRAIN_OPTIONS_PLANNED
        else:
            assert sub in commands, f"cluster/README.md runs `sr-pipeline {sub}`, which does not exist"
            known = {o for p in commands[sub].params for o in (*p.opts, *p.secondary_opts)}
        unknown = {a for a in args if a.startswith("--")} - known
        assert not unknown, f"`sr-pipeline {sub}` has no {sorted(unknown)}"
