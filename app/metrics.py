"""Prometheus metrics, in a registry of the app's own (no module globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.batching import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FRAME_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """Every metric the service exports, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "fusionserve_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "fusionserve_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "fusionserve_decode_seconds", "decoding one request's clip", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self._batching(r)
        self._streams(r)
        self._process(r)

    def _batching(self, r: CollectorRegistry) -> None:
        def per_model(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, text, ["model"], buckets=buckets, registry=r)

        self.queue_seconds = per_model("fusionserve_queue_seconds", "time a clip waited for its batch", LATENCY_BUCKETS)
        self.inference_seconds = per_model(
            "fusionserve_inference_seconds", "forward pass of one batch", LATENCY_BUCKETS
        )
        self.batch_size = per_model("fusionserve_batch_size", "clips per batch", SIZE_BUCKETS)
        self.batch_frames = per_model("fusionserve_batch_frames", "frames per batch", FRAME_BUCKETS)
        self.queue_depth = Gauge("fusionserve_queue_depth", "clips waiting", ["model"], registry=r)
        self.dropped = Counter(
            "fusionserve_dropped_clips", "clips dropped before compute", ["model", "reason"], registry=r
        )
        self.model_info = Gauge(
            "fusionserve_model_info", "loaded models (value 1)", ["model", "version", "device", "head"], registry=r
        )

    def _streams(self, r: CollectorRegistry) -> None:
        self.streams_open = Gauge(
            "fusionserve_streams_open", "open WebSocket streams and KServe sequences", ["kind"], registry=r
        )
        self.stream_frames = Counter("fusionserve_stream_frames", "stream frames stepped", ["model"], registry=r)
        self.step_batch_size = Histogram(
            "fusionserve_step_batch_size",
            "frames (one per stream) per step batch",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "fusionserve_step_seconds",
            "one step batch: encoder and head",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_frame_seconds = Histogram(
            "fusionserve_stream_frame_seconds",
            "a stream frame from received to answered",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def step_observer(self, model: str) -> Callable[[int, float], None]:
        frames, size, seconds = (
            self.stream_frames.labels(model),
            self.step_batch_size.labels(model),
            self.step_seconds.labels(model),
        )

        def observe(batch: int, took: float) -> None:
            frames.inc(batch)
            size.observe(batch)
            seconds.observe(took)

        return observe

    def _process(self, r: CollectorRegistry) -> None:
        self.ready = Gauge("fusionserve_ready", "1 when every model is loaded and warmed", registry=r)
        self.memory_trims = Gauge(
            "fusionserve_memory_trims",
            "times free heap memory was handed back while serving (MEMORY_TRIM_S)",
            registry=r,
        )
        self.heap_bytes = Gauge(
            "fusionserve_heap_bytes",
            "malloc heap of the server's process (glibc, or jemalloc when preloaded): "
            "bytes in blocks in use, and free bytes held for reuse",
            ["state"],
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "fusionserve_inflight_bytes", "request body bytes in flight, against MAX_INFLIGHT_MB", registry=r
        )
        self.frontend_requests = Counter(
            "fusionserve_frontend_requests", "requests each front end served (FRONTENDS)", ["frontend"], registry=r
        )
        self.frontend_restarts = Gauge(
            "fusionserve_frontend_restarts", "front ends started again after one exited (FRONTENDS)", registry=r
        )
        self.decoder_restarts = Gauge(
            "fusionserve_decoder_restarts",
            "times the decode processes were replaced after one died (DECODE_PROCESSES)",
            registry=r,
        )

    def batch_observer(self, model: str) -> Callable[[BatchStats], None]:
        size, frames = self.batch_size.labels(model), self.batch_frames.labels(model)
        queue, inference = self.queue_seconds.labels(model), self.inference_seconds.labels(model)

        def observe(stats: BatchStats) -> None:
            size.observe(stats.size)
            frames.observe(stats.frames)
            inference.observe(stats.inference_s)
            for q in stats.queue_s:
                queue.observe(q)

        return observe

    def drop_observer(self, model: str) -> Callable[[str], None]:
        return lambda reason: self.dropped.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
