"""Train stage: Ray Train DDP over WebDataset shards, checkpoints, resume, MLflow tracking.

Modules: ``data`` (shard streams, patches), ``loop`` (the per-worker loop) with ``setup``,
``step`` (one sync-free step), ``intervals`` (log points, validation, checkpoints) and
``stops`` (Ctrl-C, SIGTERM, preemption), ``launcher``
(preflight checks and TorchTrainer), ``checkpoint``, ``tracking`` (MLflow), ``storage``,
``validation``, ``commands`` (the CLI). Nothing heavy is imported here: the CLI imports
this package at start-up.
"""
