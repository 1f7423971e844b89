"""Preflight: storage, shards and the tracking server reachable from *every* node.

One probe task pinned to each node checks what that node will need, so a job that cannot work
fails in one line before the workers start, not an hour later on some rank. A node-local
storage path (or a file-based MLflow store) is refused on a multi-node cluster.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from pipeline.config import TrainConfig
from pipeline.console import UserError
from pipeline.train import storage
from pipeline.train.job import JobSpec


def _probe_node(checks: dict[str, Any]) -> dict[str, Any]:
    """Runs ON each node: can it see the storage token, the shards, the tracking server?"""
    import socket
    import urllib.error
    import urllib.request

    out: dict[str, Any] = {"host": socket.gethostname(), "errors": []}
    token_path, token = checks["token_path"], checks["token"]
    try:
        fs, p = storage._fs(token_path)
        with fs.open_input_stream(p) as f:
            if f.read().decode() != token:
                out["errors"].append(f"storage {checks['storage']} holds a different probe file (not the same storage)")
    except Exception as exc:
        out["errors"].append(f"storage {checks['storage']} is not visible ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:150]}){object_store_hint(token_path)}")
    from pipeline.train.datasource import node_data_problems

    problems = node_data_problems(checks["files"])  # sizes against the manifest, not only existence
    if problems:
        remote = next((f for f in checks["files"] if storage.is_uri(f)), "")
        out["errors"].append(f"{len(problems)} data problem(s), e.g. {problems[0]}{object_store_hint(remote)}")
    uri = checks.get("tracking_uri")
    if uri and uri.startswith(("http://", "https://")):
        # An authenticated API call with THIS node's credentials (as rank 0 will make them).
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            import base64

            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        elif token:
            request.add_header("Authorization", f"Bearer {token}")
        shown = checks["tracking_shown"]
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                out["errors"].append(
                    f"tracking server {shown} refused this node's credentials (HTTP {exc.code}); set "
                    "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) on every node"
                )
            else:
                out["errors"].append(f"tracking server {shown} answered HTTP {exc.code}")
        except Exception as exc:
            out["errors"].append(f"tracking server {shown} not reachable ({getattr(exc, 'reason', exc)})")
    return out


def object_store_hint(path: str) -> str:
    """What to check when a node cannot read an object store URL: its own settings.

    The launcher never forwards the driver's credentials to the workers (they would show in
    Ray's dashboard), so a node reads ``s3://`` and ``gs://`` with what it has itself; a
    "could not resolve host" or "access denied" line from pyarrow does not say that."""
    if not storage.is_uri(path):
        return ""
    scheme = path.split("://", 1)[0]
    if scheme == "s3":
        need = ("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an instance role), AWS_REGION, and "
                "AWS_ENDPOINT_URL_S3 for a store other than AWS")
    elif scheme in ("gs", "gcs"):
        need = "GOOGLE_APPLICATION_CREDENTIALS (or the node's service account)"
    else:
        need = "the credentials and endpoint of that store"
    return (f"; this node reads {scheme}:// with its own settings ({need}): the driver's are never "
            "forwarded, so set them in the environment `ray start` runs in on every node")


def check_reachability(
    cfg: TrainConfig, job: JobSpec, storage_path: str, tracking_uri: str, nodes: list[dict[str, Any]]
) -> None:
    """Storage/shards/tracking from every node; node-local storage refused on multi-node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.tracking import redact_uri

    multi = len(nodes) > 1
    if multi and not storage.is_uri(storage_path) and not cfg.shared_storage:
        fstype = storage.filesystem_type(storage_path)
        if not storage.is_shared_fstype(fstype):
            raise UserError(
                f"storage path {storage_path} is on a node-local filesystem ({fstype}) but the cluster has "
                f"{len(nodes)} nodes: checkpoints written on other nodes would be lost. Use --storage-path "
                "s3://bucket/dir (or gs://...), or a mount shared by all nodes (add --shared-storage if "
                f"{storage_path} is one)"
            )
    if multi and (tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri):
        raise UserError(
            f"the MLflow store {redact_uri(tracking_uri)} is a file on this machine, but rank 0 may run on "
            f"another of the {len(nodes)} nodes; start a tracking server and pass --tracking-uri http://HOST:PORT"
        )
    # A token written here must be readable on every node: that is what "shared" means.
    token = secrets.token_hex(8)
    token_path = storage.join(storage_path, ".sr-pipeline-probe", f"{token}.txt")
    try:
        fs, p = storage._fs(token_path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(token.encode())
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"storage path {storage_path} is not writable: {' '.join(str(exc).split())[:200]}") from None
    files = list(job.train_shards) + list(job.val_shards) + ([job.val_folder] if job.val_folder else [])
    checks = {
        "token_path": token_path, "token": token, "storage": storage_path, "files": files,
        "tracking_uri": tracking_uri, "tracking_shown": redact_uri(tracking_uri),
    }
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(checks)
        for n in nodes
    }
    try:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        if len(ready) < len(refs):
            late = [name for name, ref in refs.items() if ref not in ready]
            raise UserError(f"preflight: node(s) {', '.join(late)} did not answer within 120 s")
        for name, ref in refs.items():
            result = ray.get(ref)
            if result["errors"]:
                raise UserError(f"preflight on node {name}: {result['errors'][0]}")
    finally:
        try:
            fs.delete_file(p)
        except Exception:
            pass
