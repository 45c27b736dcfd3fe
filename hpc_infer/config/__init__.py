"""Typed run configuration: Hydra's YAML groups checked against dataclasses (schema.py),
typos named (typos.py), ranges and combinations validated (validate.py), merge hooks
loaded safely (hooks.py)."""

from .hooks import SHIPPED_HOOKS, choose_postprocess, hook_needs, postprocess_fn
from .schema import (
    CARD_SAMPLING,
    DTYPES,
    PACKAGE_DIR,
    ROUTER_POLICIES,
    TASKS,
    ClusterConfig,
    ContainerConfig,
    DataConfig,
    MergeConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    ServeConfig,
    TuneConfig,
    register_configs,
    time_to_minutes,
)
from .typos import unknown_keys, wrong_types
from .validate import KERNEL_FILES, not_a_file, not_writable, script_safe, to_run_config, validate

__all__ = [
    "CARD_SAMPLING",
    "DTYPES",
    "KERNEL_FILES",
    "PACKAGE_DIR",
    "ROUTER_POLICIES",
    "SHIPPED_HOOKS",
    "TASKS",
    "ClusterConfig",
    "ContainerConfig",
    "DataConfig",
    "MergeConfig",
    "ModelConfig",
    "RunConfig",
    "SamplingConfig",
    "ServeConfig",
    "TuneConfig",
    "choose_postprocess",
    "hook_needs",
    "not_a_file",
    "not_writable",
    "postprocess_fn",
    "register_configs",
    "script_safe",
    "time_to_minutes",
    "to_run_config",
    "unknown_keys",
    "validate",
    "wrong_types",
]
