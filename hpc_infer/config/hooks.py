"""Merge hooks (`merge.postprocess`): which one a run uses, what it reads, and loading it
with nothing but its own `_target_` imported."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import UserError


def choose_postprocess(merge_spec: Any, data_spec: Any) -> Optional[Dict[str, Any]]:
    """merge.postprocess, else the data set's; `merge.postprocess={}` turns a data set's off."""
    spec = merge_spec if merge_spec is not None else data_spec
    return dict(spec) if spec else None


def hook_needs(spec: Optional[Dict[str, Any]]) -> tuple[tuple[str, ...], str]:
    """(the record fields a merge hook reads, how to name the hook). A hook declares them
    with a `field_args` attribute: the names of its keyword arguments that hold field
    names (r1_zero_reward: answer_field, default "answer")."""
    import inspect

    if not spec:
        return (), ""
    fn = postprocess_fn(spec)
    func = getattr(fn, "func", fn)
    names = []
    for arg in getattr(func, "field_args", ()):
        value = spec.get(arg)
        if value is None:
            param = inspect.signature(func).parameters.get(arg)
            value = param.default if param is not None and param.default is not inspect.Parameter.empty else None
        if value:
            names.append(str(value))
    return tuple(names), f"merge.postprocess {spec['_target_']}"


SHIPPED_HOOKS = ("hpc_infer.rewards.",)  # hooks a merge runs from a run the caller does not own (cli.py)


def _nested_target(value: Any, path: str) -> Optional[str]:
    if isinstance(value, dict):
        if "_target_" in value:
            return path
        return next((p for k, v in value.items() if (p := _nested_target(v, f"{path}.{k}"))), None)
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _nested_target(v, f"{path}[{i}]"))), None)
    return None


def postprocess_fn(spec: Dict[str, Any]):
    """The merge hook as a callable (Hydra's instantiate with _partial_), checked before any job
    runs. Only its own `_target_` is imported: a `_target_` nested in its arguments would be
    instantiated too (and gets past Hydra's own checks), so it is refused."""
    from hydra.utils import instantiate

    target = spec.get("_target_") if isinstance(spec, dict) else None
    if not target:
        raise UserError("merge.postprocess: needs _target_: module.function (e.g. hpc_infer.rewards.r1_zero_reward)")
    nested = next(
        (p for k, v in spec.items() if k != "_target_" and (p := _nested_target(v, f"merge.postprocess.{k}"))), None
    )
    if nested:
        raise UserError(
            f"{nested}: a _target_ inside a merge hook's arguments is not allowed (it would be imported and "
            f"called too); give the hook plain values"
        )
    try:
        return instantiate(dict(spec), _partial_=True, _recursive_=False)
    except Exception as e:  # import errors, unknown arguments
        cause = e.__cause__ or e
        raise UserError(
            f"merge.postprocess._target_={target}: cannot be loaded ({type(cause).__name__}: {cause}); "
            f"check the module path and that its package is installed"
        ) from None
