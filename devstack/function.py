"""The function's settings on the local stack: one record, `.stack/function.json`, that every local
tool applies (the event sources, `preagg-refresh --local`, `invoke --stack`), so the debounce window
the esm uses is the one `stats` shows and `refresh` schedules with.

`python -m devstack start` takes them from its environment (`make stack-start CUBE_PREAGG_DEBOUNCE_MS=5000`),
validates them as the function does at cold start, records them and restarts a running esm whose
settings differ. A later start keeps what is recorded unless it is given a setting again (an empty
value means the function's default, as deployed); `make stack-stop` forgets them all. `--precise`
(`make stack-start PRECISE=1`) sets ENTITY_CUBE_MAP to cube/entity-cube-map.precise.json,
`--no-precise` (`PRECISE=0`) goes back to the default map. The Python API (`Stack.start()` without
settings: tests, the demo, benchmarks) keeps what is recorded.

    .stack/function.json  {"environ": {"CUBE_PREAGG_DEBOUNCE_MS": "5000"}, "summary": "debounce window 5000 ms ..."}

Standard library at import: `status` reads the record without .venv; validation imports the handler."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FILE = "function.json"
PRECISE_MAP = Path("cube") / "entity-cube-map.precise.json"
# The settings the stack itself provides (endpoints, names): never taken from the environment.
_PROVIDED = frozenset(
    {"CUBE_API_URL", "CUBE_API_SECRET_ARN", "DEBOUNCE_TABLE_NAME", "REFRESH_QUEUE_URL", "BUILD_DEAD_LETTER_QUEUE_URL"}
)
_PLACEHOLDERS = {
    "CUBE_API_URL": "http://127.0.0.1:4000/cubejs-api",
    "CUBE_API_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:local",
    "DEBOUNCE_TABLE_NAME": "local",
    "REFRESH_QUEUE_URL": "http://127.0.0.1/q",
    "BUILD_DEAD_LETTER_QUEUE_URL": "http://127.0.0.1/dlq",
}


class SettingsError(ValueError):
    """A setting the function would refuse at cold start; one line naming the variable and the fix."""


def names() -> frozenset[str]:
    """The environment variables the function reads as settings, less those the stack provides."""
    from handler.settings import Settings  # noqa: PLC0415 - pydantic: only where .venv exists

    aliases = {field.validation_alias for field in Settings.model_fields.values()}
    return frozenset(str(alias) for alias in aliases if isinstance(alias, str)) - _PROVIDED


def from_environ(
    environ: Mapping[str, str], root: Path, *, recorded: Mapping[str, str] | None = None, precise: bool | None = None
) -> dict[str, str]:
    """The settings after a start with this environment: the `recorded` ones, each setting given in
    `environ` replacing its value (an empty value: back to the default); `precise` True sets the map to
    cube/entity-cube-map.precise.json, False drops it (the default map)."""
    known = names()
    typos = sorted(n for n in environ if n.startswith("CUBE_PREAGG_") and n not in known)
    if typos:
        raise SettingsError(f"unknown setting {', '.join(typos)}: the function reads {', '.join(sorted(known))}")
    settings = dict(recorded or {})
    for name in sorted(known & set(environ)):
        if environ[name].strip():
            settings[name] = environ[name]
        else:
            settings.pop(name, None)
    if precise:
        settings["ENTITY_CUBE_MAP"] = json.dumps(json.loads((root / PRECISE_MAP).read_text()), separators=(",", ":"))
    elif precise is False:
        settings.pop("ENTITY_CUBE_MAP", None)
    return settings


@contextlib.contextmanager
def _without(variables: frozenset[str]) -> Iterator[None]:
    """The settings object also reads the environment: validate what was given, and only that."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name in variables}
    try:
        yield
    finally:
        os.environ.update(saved)


def validate(given: Mapping[str, str], root: Path) -> str:
    """Check the settings as the function's cold start would; return the one-line summary of what is in
    effect. SettingsError names the variable and the fix."""
    from handler.settings import ConfigurationError, load_settings  # noqa: PLC0415

    with _without(names() | _PROVIDED):
        try:
            settings = load_settings(**_PLACEHOLDERS, **given)
        except ConfigurationError as exc:
            variables = ", ".join(sorted(given)) or "the environment"
            raise SettingsError(
                f"{exc}: fix or unset it ({variables} given; an empty value means the default, README: Configuration)"
            ) from None
    window = f"debounce window {settings.debounce_ms} ms" + (
        " (CUBE_PREAGG_DEBOUNCE_MS)" if "CUBE_PREAGG_DEBOUNCE_MS" in given else " (default)"
    )
    routes = settings.entity_cube_map
    described = "; ".join(
        f"{entity} -> " + ", ".join(_route(route) for route in routes.routes_for(entity))
        for entity in routes.entity_types()
    )
    source = "default"
    if "ENTITY_CUBE_MAP" in given:
        precise = json.loads((root / PRECISE_MAP).read_text())
        source = str(PRECISE_MAP) if json.loads(given["ENTITY_CUBE_MAP"]) == precise else "ENTITY_CUBE_MAP"
    others = [
        f"{name}={value}" for name, value in given.items() if name not in ("CUBE_PREAGG_DEBOUNCE_MS", "ENTITY_CUBE_MAP")
    ]
    parts = [window, f"entity map {source} ({described})", f"time zones {', '.join(settings.cube_timezones)}"]
    return ", ".join(parts + others)


def _route(route: Any) -> str:
    text = str(route.target)
    if route.partition_by:
        text += f" by {route.partition_by} per {route.granularity}"
    return text


def record(state: Path, given: Mapping[str, str], summary: str) -> None:
    path = state / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    tmp.write_text(json.dumps({"environ": dict(given), "summary": summary}, indent=2) + "\n")
    tmp.replace(path)


def recorded(state: Path) -> dict[str, Any]:
    """`{"environ": {...}, "summary": "..."}` as recorded by the last start ({} before any)."""
    try:
        data = json.loads((state / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_environ(state: Path) -> dict[str, str]:
    environ = recorded(state).get("environ")
    return {str(k): str(v) for k, v in environ.items()} if isinstance(environ, dict) else {}


def apply(state: Path, environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Make `environ` carry exactly the recorded settings: the recorded ones set, any other setting
    (from the shell) removed, so the function's defaults apply to it as they do in the esm."""
    given = recorded_environ(state)
    for name in names() - set(given):
        environ.pop(name, None)
    environ.update(given)
    return given
