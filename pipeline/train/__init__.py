"""Train stage: Ray Train DDP over WebDataset shards, checkpoints, resume, MLflow tracking.

Modules: ``data`` (shard streams, patches) over ``datasource`` (manifest, checks) and
``shardio``; the per-worker ``loop`` with ``setup``, ``step`` (one sync-free step),
``intervals`` (log points, validation, checkpoints) and ``stops`` (Ctrl-C, SIGTERM,
preemption); the driver's ``launcher`` (the order of things) over ``job`` (what the workers
get), ``cluster`` (connect, resources), ``preflight`` (per-node checks), ``credentials``,
``runs`` (which run) and ``fit`` (the TorchTrainer, Ctrl-C/SIGTERM); ``checkpoint``,
``storage``, ``validation``; MLflow: ``tracking`` (the run, the workers' logger), ``sender``
(the non-blocking queue and the journal), ``finish`` (the bounded end of a run), ``sync``
(replay); ``commands`` (the CLI). Nothing heavy is imported here: the CLI imports this
package at start-up.
"""
