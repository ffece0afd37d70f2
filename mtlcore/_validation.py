"""Small checks shared by the modules that validate their own options."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def string_hint(value: Any) -> str:
    return f" (got the string {value!r}: quoted in YAML, or passed as text)" if isinstance(value, str) else ""
