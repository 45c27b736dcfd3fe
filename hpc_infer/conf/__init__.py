"""Hydra config groups (a package so Hydra finds them as `pkg://hpc_infer.conf` from the console script)."""
