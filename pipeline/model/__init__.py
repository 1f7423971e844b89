"""DNLAN (spec sections 1-3): the network, the DNLA fast path and checkpoint I/O.

Public API (see notes/contracts.md): build_model, build_from_config, set_hash_mode,
save_checkpoint, export_state_dict, load_checkpoint, read_checkpoint. Importing this package
imports torch; stage command modules import it inside functions only.
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
