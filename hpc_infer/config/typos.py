"""Typo search: settings the schema does not have (with the nearest valid key) and
command-line values a number or boolean field cannot hold, named before Hydra's own
less helpful words."""

from __future__ import annotations

from typing import Any


def unknown_keys(tree: Any, schema: type, path: str = "") -> list[str]:
    """Keys the dataclass schema does not have, however they arrived (`+key=`, a YAML file),
    each with the nearest valid key; free-form fields (Dict/Any) may hold anything."""
    import dataclasses
    import difflib
    import typing

    if not isinstance(tree, dict) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema)
    problems = []
    for key, value in tree.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)
            hint = (
                f"did you mean {(path + '.' if path else '') + near[0]}?"
                if near
                else f"valid keys here: {', '.join(hints)}"
            )
            problems.append(f"{where}: unknown setting; {hint}")
        elif dataclasses.is_dataclass(hints[key]):
            problems += unknown_keys(value, hints[key], where)
    return problems


def wrong_types(tree: Any, schema: type, path: str = "") -> list[str]:
    """Values typed on the command line (strings) that a number or boolean field cannot hold,
    each with the field's default as an example: Hydra would stop with its own words and
    exit 1 ("could not be converted to Integer")."""
    import dataclasses
    import re
    import typing

    if not isinstance(tree, dict) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    words = {int: "a whole number", float: "a number", bool: "true or false"}
    problems = []
    for key, value in tree.items():
        where = f"{path}.{key}" if path else str(key)
        kind = hints.get(key)
        if dataclasses.is_dataclass(kind):
            problems += wrong_types(value, kind, where)
            continue
        optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
        if optional:
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), None)
        if (
            kind not in words
            or not isinstance(value, str)
            or value.startswith(("${", "'", '"'))
            or (optional and value == "null")
        ):
            continue
        ok = (
            re.fullmatch(r"[+-]?\d+", value)
            if kind is int
            else value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")
            if kind is bool
            else re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf|nan", value.lower())
        )
        if not ok:
            example = defaults.get(key)
            example = str(example).lower() if isinstance(example, bool) else example
            problems.append(
                f"{where}={value}: must be {words[kind]}"
                + (f", e.g. {where}={example}" if isinstance(example, (int, float, str)) else "")
            )
    return problems
