"""`sr-pipeline info`: the environment report users paste into bug reports."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pipeline import __version__, defaults
from pipeline.tracking import redact_uri

PACKAGES = ("torch", "ray", "mlflow", "webdataset", "numpy", "pillow", "typer")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def accelerator_report() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda or "none (CPU build)",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "nccl_available": bool(torch.distributed.is_available() and torch.distributed.is_nccl_available()),
        "gloo_available": bool(torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        "torch_threads": torch.get_num_threads(),
    }
    return report


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: `ray.init` retries an unreachable GCS for a long time."""
    import socket

    from pipeline.console import UserError

    if address in {"auto", "local"} or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address must be HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"cannot connect to Ray cluster at {address}: {exc.strerror or exc}") from None


def cluster_report(address: str) -> dict[str, Any]:
    """Resources of a running Ray cluster (connects as a client driver, then disconnects)."""
    import ray

    from pipeline.console import UserError

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    check_reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ... depending on phase
        raise UserError(f"cannot connect to Ray cluster at {address}: {exc}") from None
    try:
        nodes = [
            {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "alive": n["Alive"],
                "cpus": n["Resources"].get("CPU", 0.0),
                "gpus": n["Resources"].get("GPU", 0.0),
                "memory_gb": round(n["Resources"].get("memory", 0.0) / 2**30, 2),
                "is_head": "node:__internal_head__" in n["Resources"],
            }
            for n in ray.nodes()
        ]
        total = ray.cluster_resources()
        return {
            "address": address,
            "ray_version": ray.__version__,
            "nodes": nodes,
            "alive_nodes": sum(1 for n in nodes if n["alive"]),
            "total_cpus": total.get("CPU", 0.0),
            "total_gpus": total.get("GPU", 0.0),
        }
    finally:
        ray.shutdown()


def environment_report(address: str | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "sr_pipeline": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "accelerator": accelerator_report(),
        "mlflow_tracking_uri": redact_uri(defaults.tracking_uri()),
        "sr_pipeline_home": str(defaults.home()),
    }
    if address:
        report["ray_cluster"] = cluster_report(address)
    return report


def render_text(report: dict[str, Any]) -> str:
    acc = report["accelerator"]
    lines = [
        f"sr-pipeline      {report['sr_pipeline']}",
        f"python           {report['python']} ({report['platform']})",
        f"cpu count        {report['cpu_count']}",
    ]
    lines += [f"{name:<16} {ver}" for name, ver in report["packages"].items()]
    gpus = ", ".join(acc["gpus"]) if acc["gpus"] else "none"
    lines += [
        f"cuda             {'available' if acc['cuda_available'] else 'not available'} (build: {acc['cuda_version']})",
        f"gpus             {gpus}",
        f"bf16 on gpu      {'yes' if acc['bf16_supported'] else 'no'}",
        f"dist backends    nccl={'yes' if acc['nccl_available'] else 'no'} gloo={'yes' if acc['gloo_available'] else 'no'}",
        f"torch threads    {acc['torch_threads']}",
        f"mlflow tracking  {report['mlflow_tracking_uri']}",
        f"home             {report['sr_pipeline_home']}",
    ]
    cluster = report.get("ray_cluster")
    if cluster:
        lines.append(
            f"ray cluster      {cluster['address']}: {cluster['alive_nodes']} node(s) alive, "
            f"{cluster['total_cpus']:g} CPU, {cluster['total_gpus']:g} GPU"
        )
        for n in cluster["nodes"]:
            role = "head" if n["is_head"] else "worker"
            state = "alive" if n["alive"] else "dead"
            lines.append(
                f"  node {n['node_id'][:12]}  {n['address']:<15} {role:<6} {state:<5} "
                f"CPU {n['cpus']:g}  GPU {n['gpus']:g}  mem {n['memory_gb']:g} GiB"
            )
    return "\n".join(lines)
