"""Experiments, whole runs in one process: the federated simulation, the paper's experiment table, its results
lines, and its report (docs/results.md)."""
