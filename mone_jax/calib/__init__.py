"""Calibration: the jitted statistics pass and its resumable checkpoints."""
