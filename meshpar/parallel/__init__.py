"""How a step runs in parallel: the activation-layout context, the layer scan, remat, manual ZeRO,
pipeline schedules and the pipeline itself."""
