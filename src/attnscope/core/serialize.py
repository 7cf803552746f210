"""Typed results back from their JSON: nested dataclasses rebuilt with ``dacite`` (tuples from JSON lists,
enums from their values), after checking the file's ``schema_version``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import dacite

from attnscope.core.errors import AttnscopeError

T = TypeVar("T")
_CONFIG = dacite.Config(cast=[tuple, Enum], check_types=False)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls`` (a dataclass) from ``data``; nested dataclasses, lists, tuples and enums included."""
    return dacite.from_dict(cls, data, config=_CONFIG)


def read_versioned(path: Path, expected: int, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a missing file, bad JSON or another ``schema_version`` is one-line error."""
    if not path.is_file():
        raise AttnscopeError(f"{path} does not exist; pass the output folder of the command that writes {what}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttnscopeError(f"{path} is not valid JSON ({err}); re-run the command that writes {what}") from None
    if not isinstance(d, dict) or d.get("schema_version") != expected:
        got = d.get("schema_version") if isinstance(d, dict) else None
        raise AttnscopeError(f"{path} has schema version {got}, this attnscope reads {expected}; re-run the command "
                             f"that writes {what}")
    return d
