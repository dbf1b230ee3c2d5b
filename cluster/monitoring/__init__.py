"""Prometheus metrics for training and the renderer, and the HTTP exporter that serves them.

Metric names are the contract with `prometheus.yml` and `grafana-dashboard.json` beside this
module; change them in all three places together.
"""

from cluster.monitoring.metrics import (
    DEFAULT_RENDERER_PORT,
    DEFAULT_TRAINING_PORT,
    RendererMetrics,
    TrainingMetrics,
    start_exporter,
    start_exporter_in_range,
)

__all__ = [
    "DEFAULT_RENDERER_PORT",
    "DEFAULT_TRAINING_PORT",
    "RendererMetrics",
    "TrainingMetrics",
    "start_exporter",
    "start_exporter_in_range",
]
