"""Preprocess stage: DIV2K (or any image folder) to WebDataset shards with MATLAB-exact LR.

Importing the package stays cheap (numpy only) because the evaluate and train stages import
``imresize`` from here; the shard writer, downloader and CLI live in their own modules.
"""

from __future__ import annotations

from pipeline.preprocess.imresize import imresize

__all__ = ["imresize"]
