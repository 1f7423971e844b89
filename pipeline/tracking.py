"""MLflow plumbing shared by `train`, `evaluate`, `demo` and `ui`.

Why a module of its own: every stage must agree on the store (one default, see
:mod:`pipeline.defaults`), on where artifacts of the embedded store live (so the UI can serve
them whatever directory it was started from), and on how a flaky tracking server is treated:
unreachable at start is one clear error; a hiccup during a multi-hour job is retried and
logged, never fatal.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pipeline import console, defaults
from pipeline.console import UserError

T = TypeVar("T")

# Param values MLflow accepts (longer ones are truncated rather than failing the run).
MAX_PARAM_LEN = 6000
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it is for model
# training: set on every experiment the pipeline creates (train, evaluate, demo).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_SECRET_MARKERS = ("password", "secret", "token", "key_id", "access_key", "credential")


def resolve_uri(explicit: str | None = None) -> str:
    """Tracking URI in effect; creates the home directory for the embedded sqlite store."""
    uri = defaults.tracking_uri(explicit)
    if defaults.is_default_local_store(uri):
        defaults.home().mkdir(parents=True, exist_ok=True)
        defaults.artifact_root().mkdir(parents=True, exist_ok=True)
    return uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer.

    Credentials embedded in the URI (``https://user:pass@host``) are sent as HTTP basic auth,
    as MLflow's client does, and never appear in a message.
    """
    if not uri.startswith(("http://", "https://")):
        if uri.startswith("sqlite:///"):
            parent = Path(uri[len("sqlite:///") :]).parent
            if not parent.exists():
                raise UserError(f"MLflow store {uri}: directory {parent} does not exist")
        return
    shown = redact_uri(uri)
    url, headers = _split_credentials(uri.rstrip("/") + "/health")
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status != 200:
                raise UserError(f"MLflow tracking server {shown} answered {resp.status} on /health")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # behind authentication: reachable, credentials come from env
            return
        raise UserError(f"MLflow tracking server {shown} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"MLflow tracking server {shown} is not reachable: {reason}") from None


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(URL without user:password, headers carrying them as basic auth)."""
    import base64
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    token = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    return redact_uri(url), {"Authorization": "Basic " + base64.b64encode(token).decode()}


def experiment_id(name: str, uri: str) -> str:
    """Id of experiment `name`, created if needed (tagged as model development, so the UI opens
    its runs, charts and models rather than the GenAI overview).

    In the embedded store, artifacts go to ``<home>/mlartifacts/<name>`` (an absolute path),
    not MLflow's cwd-relative ``./mlruns``, so the UI finds them from anywhere.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if defaults.is_default_local_store(uri):
        location = (defaults.artifact_root() / name).as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_quiet = threading.local()


@contextmanager
def quiet_retries() -> Iterator[None]:
    """In this thread, :func:`with_retries` keeps its warnings to itself (a caller that sums
    up an outage in one line of its own, e.g. the end of `train`)."""
    before = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = before


def with_retries(fn: Callable[..., T], *args: Any, attempts: int = 5, what: str = "MLflow call", **kwargs: Any) -> T | None:
    """Call `fn`, retrying with backoff; after the last failure log it and return None.

    Tracking is an observer of training: losing one metric point is better than losing a
    multi-hour job because the tracking server restarted.
    """
    delay = 1.0
    warn = (lambda message: None) if getattr(_quiet, "on", False) else console.warn
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # network errors surface as many exception types
            if attempt == attempts:
                warn(f"{what} failed after {attempts} attempts, continuing without it: {exc}")
                return None
            warn(f"{what} failed (attempt {attempt}/{attempts}), retrying in {delay:.0f}s: {exc}")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    return None


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params ready for MLflow: strings, bounded length, nothing that looks like a secret."""
    out = {}
    for key, value in params.items():
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            continue
        text = "" if value is None else str(value)
        out[key] = text[:MAX_PARAM_LEN]
    return out


def redact_uri(uri: str) -> str:
    """Drop user:password from a URI before it is printed or logged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def run_url(uri: str, experiment: str, run_id: str) -> str | None:
    """Browser link to a run when the store is served over HTTP."""
    if uri.startswith(("http://", "https://")):
        return f"{redact_uri(uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return None


def ui_command(tracking_uri: str) -> str:
    """The exact command that opens the MLflow UI on `tracking_uri` (printed by demo and train)."""
    exe = sys.argv[0] if sys.argv and sys.argv[0].endswith("sr-pipeline") else "sr-pipeline"
    if shutil.which("sr-pipeline") == os.path.abspath(exe):
        exe = "sr-pipeline"
    prefix = ""
    if os.environ.get(defaults.HOME_ENV):
        prefix = f"{defaults.HOME_ENV}={defaults.home()} "
    if tracking_uri != defaults.default_tracking_uri():
        return f"{prefix}{exe} ui --tracking-uri {tracking_uri}"
    return f"{prefix}{exe} ui"
