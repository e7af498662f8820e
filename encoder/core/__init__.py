"""Machinery shared by every stage: the run-folder contract (status, key, lock, metrics)."""
