"""sr-pipeline: DNLAN super-resolution from DIV2K shards to cluster training and benchmark tables.

Importing this package is cheap on purpose: heavy libraries (torch, ray, mlflow, webdataset)
are imported inside the functions that need them so that `sr-pipeline --help` stays instant.
"""

from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("sr-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
