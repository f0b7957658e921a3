"""Training: Lightning module, optimiser schedule, checkpoints and the run wiring."""
