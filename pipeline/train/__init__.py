"""Train stage: Ray Train DDP over WebDataset shards, checkpoints, resume, MLflow tracking.

Modules: ``data`` (shard streams, patches), ``loop`` (the per-worker loop); the driver's
``launcher`` (the order of things) over ``job`` (what the workers get), ``cluster`` (connect,
resources), ``preflight`` (per-node checks), ``credentials``, ``runs`` (which run) and ``fit``
(the TorchTrainer, Ctrl-C); ``checkpoint``, ``tracking`` (MLflow), ``storage``,
``validation``, ``commands`` (the CLI). Nothing heavy is imported here: the CLI imports
this package at start-up.
"""
