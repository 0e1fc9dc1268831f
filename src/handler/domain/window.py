"""The adaptive debounce window (docs/load-aware.md): per key, once per build, the window doubles when
the build started long after the oldest mutation it covers (the key waited for build budget or in
Cube's queue for more than twice its window) and halves back when it started within the window (Cube
keeps up), between its target's base and maximum. So the window follows the backlog (about half the
wait) instead of adding to it. A control loop of its own: this module decides the next window; the
debounce store keeps it (`windowMs`) and applies it at each claim (`windowEndsAt`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.domain.model import RefreshKey, is_valid_target

DEFAULT_MAX_WINDOW_MS = 300_000
MAX_WINDOW_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class WindowRange:
    base_ms: int
    max_ms: int

    def clamp(self, value: int) -> int:
        return max(self.base_ms, min(self.max_ms, value))


class Windows:
    """Each key's window range: the target's own (`CUBE_PREAGG_TARGET_WINDOWS`, by pre-aggregation
    id, then by cube), else the defaults. A maximum below its base is raised to the base."""

    def __init__(
        self, base_ms: int, max_ms: int | None = None, overrides: Mapping[str, WindowRange] | None = None
    ) -> None:
        self.default = WindowRange(base_ms, max(base_ms, base_ms if max_ms is None else max_ms))
        self.overrides = {t: WindowRange(r.base_ms, max(r.base_ms, r.max_ms)) for t, r in (overrides or {}).items()}

    def range_for(self, key: RefreshKey) -> WindowRange:
        return self.overrides.get(key.target) or self.overrides.get(key.cube) or self.default

    def base(self, key: RefreshKey) -> int:
        return self.range_for(key).base_ms

    def current(self, key: RefreshKey, stored: int | None) -> int:
        """The window a claim of the key applies (the stored one, within the key's range)."""
        span = self.range_for(key)
        return span.clamp(span.base_ms if stored is None else stored)

    def after_build(self, key: RefreshKey, stored: int | None, *, start_lag_ms: int) -> int:
        """A build of the key started `start_lag_ms` after the oldest mutation it covers: more than
        twice the window (a backlog: budget or Cube's queue) doubles it, within the window (Cube keeps
        up: a leading refresh starts at once, a trailing one at the window's end) halves it, at most
        the maximum and at least the base; in between it stays."""
        span = self.range_for(key)
        current = self.current(key, stored)
        if start_lag_ms > 2 * current:
            return span.clamp(2 * current)
        if start_lag_ms <= current:
            return span.clamp(current // 2)
        return current


_SHAPE = 'must be a JSON object of target -> {"debounceMs": int, "maxDebounceMs": int}'


def parse_target_windows(text: str | None, *, base_ms: int, max_ms: int) -> dict[str, WindowRange]:
    """`CUBE_PREAGG_TARGET_WINDOWS`: per cube or pre-aggregation id, its own base and/or maximum
    window; a missing one is the default. Raises ValueError naming the problem."""
    if text is None or not text.strip():
        return {}
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(_SHAPE) from exc
    if not isinstance(data, dict):
        raise ValueError(_SHAPE)
    ranges: dict[str, WindowRange] = {}
    for target, entry in data.items():
        if not is_valid_target(target):
            raise ValueError(f"{target!r} is not a cube name or Cube.preAggregation id")
        if not isinstance(entry, dict) or not entry or set(entry) - {"debounceMs", "maxDebounceMs"}:
            raise ValueError(f"target {target!r}: {_SHAPE}")
        values = {}
        for name, default in (("debounceMs", base_ms), ("maxDebounceMs", max_ms)):
            value = entry.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_WINDOW_MS:
                raise ValueError(f"target {target!r}: {name} must be an integer of milliseconds, 0..{MAX_WINDOW_MS}")
            values[name] = value
        ranges[target] = WindowRange(values["debounceMs"], max(values["debounceMs"], values["maxDebounceMs"]))
    return ranges
