"""Where the devices come from: CPU emulation, multi-process jobs (``jax.distributed``), the
launcher."""
