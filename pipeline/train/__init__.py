"""Train stage: Ray Train DDP over WebDataset shards, checkpoints, resume, MLflow tracking.

Modules: ``data`` (shard streams, patches), ``loop`` (the per-worker loop), ``launcher``
(preflight checks and TorchTrainer), ``checkpoint``, ``tracking`` (MLflow), ``storage``,
``validation``, ``commands`` (the CLI). Nothing heavy is imported here: the CLI imports
this package at start-up.
"""
