"""The mesh axis names meshpar gives a meaning to, defined once.

- ``data``: data parallel (batch split, parameters replicated, gradients all-reduced);
- ``fsdp``: ZeRO (optimizer state, + gradients, + parameters split over it), a batch axis too;
- ``tensor``: Megatron tensor parallel (and sequence parallel);
- ``pipe``: pipeline stages.

A mesh may carry other axis names; meshpar's strategies only give these four a role.
"""

from __future__ import annotations

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
PIPE = "pipe"

#: Every axis name with a role, outermost first (the order :func:`meshpar.make_mesh` lays them out).
MESH_AXES = (PIPE, DATA, FSDP, TENSOR)
#: The axes the batch is split over (in this order).
BATCH_AXES = (DATA, FSDP)
