"""The training engine: config + presets, model loading, packing, speed, launch, checkpoints, the loop."""
