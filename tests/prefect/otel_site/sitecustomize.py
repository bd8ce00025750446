"""OpenTelemetry's metrics SDK in every Python process started with this directory on PYTHONPATH.

What an operator puts beside a Prefect worker or a ``flow.serve()`` process: the
flow runs execute in child processes (a spawned process for a served flow,
``python -m prefect.engine`` for a worker), which inherit the environment, so
each run process installs its own ``MeterProvider`` before any flow code runs.
In production the exporter would be ``OTLPMetricExporter()`` (package
``opentelemetry-exporter-otlp``, endpoint from ``OTEL_EXPORTER_OTLP_ENDPOINT``);
here it writes each export as one JSON line to ``$METRICS_DIR/metrics-<pid>.jsonl``,
so the test reads what each run process exported. The export interval is the
standard ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), and the service name
``OTEL_SERVICE_NAME``; the provider's shutdown at exit exports the last values.
"""

from __future__ import annotations

import os

if os.environ.get("METRICS_DIR"):
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    _out = open(os.path.join(os.environ["METRICS_DIR"], f"metrics-{os.getpid()}.jsonl"), "a")  # noqa: SIM115 - open for the process's life
    _exporter = ConsoleMetricExporter(out=_out, formatter=lambda data: data.to_json(indent=None) + "\n")
    metrics.set_meter_provider(MeterProvider(resource=Resource.create(),
                                             metric_readers=[PeriodicExportingMetricReader(_exporter)]))
