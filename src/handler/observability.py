"""The shared logger, tracer and metrics, and the Telemetry adapter the domain reports through."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.shared import constants
from aws_lambda_powertools.shared.functions import resolve_truthy_env_var_choice

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


class NoTracer:
    """Stands in for Powertools' Tracer when tracing is off (POWERTOOLS_TRACE_DISABLED, which the
    template sets from TracingEnabled): a disabled Tracer still loads the X-Ray SDK at cold start."""

    def capture_lambda_handler(self, **_: Any) -> Callable[[_Handler], _Handler]:
        def unchanged(handler: _Handler) -> _Handler:
            return handler

        return unchanged


def _tracing_disabled() -> bool:
    # Powertools' own variable, read the way Powertools reads it.
    return resolve_truthy_env_var_choice(env=os.getenv(constants.TRACER_DISABLED_ENV, "false"))


logger = Logger()
# Typed as Tracer: callers use only capture_lambda_handler, which NoTracer provides.
tracer = cast(Tracer, NoTracer()) if _tracing_disabled() else Tracer()
metrics = Metrics()
# The domain logs through the standard library; give its loggers the same JSON format.
copy_config_to_registered_loggers(source_logger=logger, include={"handler"})


class PowertoolsTelemetry:
    """Counts and timings as EMF. Dimensioned counts (by cube, by error class) are summed during the
    invocation and written once per dimension value at flush, not one log line per event."""

    def __init__(self, sink: Metrics = metrics) -> None:
        self._metrics = sink
        self._dimensioned: dict[tuple[str, str, str], int] = defaultdict(int)

    def count(self, name: str, value: int = 1, dimension: tuple[str, str] | None = None) -> None:
        if dimension is None:
            self._metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
        else:
            self._dimensioned[(name, *dimension)] += value

    def timing(self, name: str, ms: float) -> None:
        self._metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=ms)

    def flush_dimensioned(self) -> None:
        pending, self._dimensioned = self._dimensioned, defaultdict(int)
        for (name, dim_name, dim_value), value in sorted(pending.items()):
            with single_metric(
                name=name,
                unit=MetricUnit.Count,
                value=value,
                namespace=self._metrics.namespace,
                default_dimensions=self._metrics.default_dimensions,
            ) as metric:
                metric.add_dimension(name=dim_name, value=dim_value)
