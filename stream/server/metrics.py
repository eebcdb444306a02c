"""`/metrics`: Prometheus text for the server and each open session, read at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from stream.server.app import StreamServer

logger = logging.getLogger(__name__)


class Metrics(Collector):
    """`/metrics`: the server's and each open session's numbers, read at scrape time."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        info = GaugeMetricFamily("stream_model_info", "The loaded model", labels=["model", "placeholder"])
        info.add_metric([server.model_name, str(server.placeholder).lower()], 1)
        yield info
        yield GaugeMetricFamily("stream_sessions", "Open sessions", value=len(server.sessions))
        yield GaugeMetricFamily("stream_max_sessions", "Sessions allowed at once", value=server.max_sessions)
        yield CounterMetricFamily(
            "stream_sessions_started",
            "Sessions started since the server started",
            value=server.sessions_started,
        )
        yield GaugeMetricFamily(
            "stream_budget_seconds", "Frame-time budget: 1 / target FPS", value=1.0 / server.target_fps
        )
        labels = ["session"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "frames_in": CounterMetricFamily("stream_frames_in", "Frames received", labels=labels),
            "frames": CounterMetricFamily("stream_frames_out", "Frames processed and sent", labels=labels),
            "drops": CounterMetricFamily(
                "stream_dropped_frames", "Input frames replaced before the model took them", labels=labels
            ),
            "skipped": CounterMetricFamily(
                "stream_skipped_frames",
                "Frames the similarity filter answered without the model",
                labels=labels,
            ),
            "fps_in": GaugeMetricFamily(
                "stream_fps_in", "Input frame rate over the recent window", labels=labels
            ),
            "fps_out": GaugeMetricFamily(
                "stream_fps_out", "Output frame rate over the recent window", labels=labels
            ),
        }
        holds = GaugeMetricFamily(
            "stream_budget_holds", "1 when p95 frame time is within budget", labels=labels
        )
        stages = GaugeMetricFamily(
            "stream_stage_latency_seconds",
            "Recent per-stage latency quantiles",
            labels=["session", "stage", "quantile"],
        )
        level = GaugeMetricFamily(
            "stream_adaptive_level", "Adaptive level (0 = the configured steps and size)", labels=labels
        )
        steps = GaugeMetricFamily("stream_steps", "Denoising steps now run per frame", labels=labels)
        width = GaugeMetricFamily("stream_model_width", "Model width now used, px", labels=labels)
        height = GaugeMetricFamily("stream_model_height", "Model height now used, px", labels=labels)
        changes = CounterMetricFamily("stream_adaptive_changes", "Adaptive level changes", labels=labels)
        for session in list(server.sessions.values()):
            snap = session.snapshot()
            key = [session.id]
            for name, family in families.items():
                family.add_metric(key, snap[name])
            if snap["budget"]["holds"] is not None:
                holds.add_metric(key, float(snap["budget"]["holds"]))
            for stage, values in snap["latency_ms"].items():
                for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                    if values[name] is not None:
                        stages.add_metric([session.id, stage, q], values[name] / 1000.0)
            adaptive = snap["adaptive"]
            level.add_metric(key, adaptive["level"])
            steps.add_metric(key, adaptive["steps"])
            width.add_metric(key, adaptive["width"])
            height.add_metric(key, adaptive["height"])
            changes.add_metric(key, adaptive["change_count"])
        yield from families.values()
        yield from (holds, stages, level, steps, width, height, changes)
