"""Tracking credentials embedded in a URI (``http://user:password@host``).

They never reach Ray as part of the URI (runtime env, job spec, config, checkpoints, logs):
the URI is redacted and the credentials travel as the variables MLflow reads
(:data:`CREDENTIAL_ENV`), to the workers in their runtime env only (see
:func:`pipeline.train.cluster.worker_env`) and to the driver for the duration of the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

URI_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def uri_credentials(uri: str) -> dict[str, str]:
    """MLflow's credential variables for the user:password embedded in `uri` ({} when none)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return {}
    return {
        "MLFLOW_TRACKING_USERNAME": unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": unquote(parts.password or ""),
    }


@contextmanager
def credentials_in_env(uri: str) -> Iterator[None]:
    """While the driver talks to MLflow: the URI's credentials as MLflow's variables.

    The driver then uses the redacted URI like the workers do, so an MLflow error message
    (which quotes the request URL) can never show the password. Entered after Ray is up:
    a local Ray instance must not inherit them either. The previous values come back after.
    """
    values = uri_credentials(uri)
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
