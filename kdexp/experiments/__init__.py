"""Experiment management: run registry, sweeps, the fair-comparison driver, W&B mirror, composing configs."""
