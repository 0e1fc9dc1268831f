"""The adaptive debounce window (docs/load-aware.md): per key, the window doubles while the key meets
a backlog (deferred for build budget, or its build waited in Cube's queue) and halves back once Cube
keeps up, between its target's base and maximum. A control loop of its own: this module decides the
next window; the debounce store keeps it (`windowMs`) and applies it at each claim (`windowEndsAt`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.domain.model import RefreshKey, is_valid_target

# A build that waited in Cube's queue at least this long (or a quarter of its base window, if more)
# met a backlog: its key's window widens.
BACKLOG_WAIT_FLOOR_MS = 5_000
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

    def widened(self, key: RefreshKey, stored: int | None) -> int:
        """The key met a backlog: double its window (at most its maximum)."""
        return self.range_for(key).clamp(2 * self.current(key, stored))

    def after_build(self, key: RefreshKey, stored: int | None, *, queue_wait_ms: int) -> int:
        """A build of the key ended: widen if it waited in Cube's queue, else halve back to the base."""
        span = self.range_for(key)
        if queue_wait_ms >= max(BACKLOG_WAIT_FLOOR_MS, span.base_ms // 4):
            return self.widened(key, stored)
        return span.clamp(self.current(key, stored) // 2)


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
