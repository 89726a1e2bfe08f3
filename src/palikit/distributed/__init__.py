"""Scaling past one process: Ray Data batch inference and Ray Serve replicas (imported only when used)."""
