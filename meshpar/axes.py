"""The mesh axis names meshpar gives a meaning to, defined once.

- ``data``: data parallel (batch split, parameters replicated, gradients all-reduced);
- ``fsdp``: ZeRO (optimizer state, + gradients, + parameters split over it), a batch axis too;
- ``tensor``: Megatron tensor parallel (and sequence parallel);
- ``pipe``: pipeline stages;
- ``diloco``: low-communication data parallel (DiLoCo, :mod:`meshpar.train.diloco`): each replica
  group along it trains on its own share of the batch and synchronises every H steps.

A mesh may carry other axis names; meshpar's strategies give the first four a role, and
:class:`meshpar.DiLoCoTrainer` the last.
"""

from __future__ import annotations

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
PIPE = "pipe"
DILOCO = "diloco"

#: Every axis name with a role, outermost first (the order :func:`meshpar.make_mesh` lays them out).
MESH_AXES = (DILOCO, PIPE, DATA, FSDP, TENSOR)
#: The axes the batch is split over (in this order).
BATCH_AXES = (DATA, FSDP)
