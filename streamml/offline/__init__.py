"""Offline learning: per-query scoring heads, ranking losses and metrics, the CV harness and its baselines."""
