"""DNLAN (spec sections 1-3): the network, the DNLA fast path and checkpoint I/O.

Public API:

* ``build_model(preset, scale, **overrides)`` / ``build_from_config(cfg)``: a fresh DNLAN whose
  state_dict has the reference's keys, in the reference's order.
* ``set_hash_mode(model, "stochastic" | "fixed", seed)``, ``temporary_hash_mode(...)`` (context
  manager) and ``hash_mode_of(model)``: the reference redraws its hash projection at every
  forward; ``fixed`` makes inference reproducible (layer ``i`` uses ``seed + i``).
* ``save_checkpoint(path, model, **extra)`` (our self-describing format),
  ``export_state_dict(path, model)`` (the reference's plain state_dict), both atomic;
  ``load_checkpoint(path, preset, scale, **overrides)`` and ``read_checkpoint(path)`` load
  either format with ``weights_only=True`` and strict key/shape matching, failing with one-line
  ``UserError``s.
* ``count_parameters(model, trainable_only)``.

Importing this package imports torch; stage command modules import it inside functions only.
"""

from pipeline.model.attention import DecoupledNonLocalAttention
from pipeline.model.checkpoint import (
    export_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pipeline.model.dnlan import (
    DNLAN,
    build_from_config,
    build_model,
    count_parameters,
    hash_mode_of,
    set_hash_mode,
    temporary_hash_mode,
)

__all__ = [
    "DNLAN",
    "DecoupledNonLocalAttention",
    "build_from_config",
    "build_model",
    "count_parameters",
    "hash_mode_of",
    "export_state_dict",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "set_hash_mode",
    "temporary_hash_mode",
]
