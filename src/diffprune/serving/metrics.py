"""The server's metrics, in the Prometheus text format (prometheus_client, a registry per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffprune.serving.bank import TaskBank

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, bank: TaskBank) -> None:
        self.bank = bank
        self.registry = r = CollectorRegistry()
        self.requests = Counter("diffprune_http_requests", "HTTP requests by route and status",
                                ["path", "method", "status"], registry=r)
        self.latency = Histogram("diffprune_http_request_seconds", "HTTP request latency", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("diffprune_predictions", "Inputs predicted, by task", ["task"], registry=r)
        self.batches = Histogram("diffprune_batch_rows", "Inputs per batch run", buckets=ROW_BUCKETS, registry=r)
        self.batch_seconds = Histogram("diffprune_batch_seconds", "Time to run one batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.forwards = Gauge("diffprune_forwards", "Forwards run, by how", ["how"], registry=r)
        self.tasks = Gauge("diffprune_tasks", "Tasks served", registry=r)
        self.loaded = Gauge("diffprune_tasks_loaded", "Tasks whose patch is in memory", registry=r)
        self.loaded_bytes = Gauge("diffprune_patch_bytes", "Memory held by loaded patches", registry=r)

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        route = _route(path)  # request paths carry task names: label by route, never by raw path
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def predicted(self, task: str, inputs: int) -> None:
        self.predictions.labels(task).inc(inputs)

    def batch(self, requests: list, seconds: float) -> None:
        self.batches.observe(sum(len(r.inputs) for r in requests))
        self.batch_seconds.observe(seconds)

    def render(self, engine) -> tuple[bytes, str]:
        self.forwards.labels("switching").set(engine.switches)
        self.forwards.labels("mixed").set(engine.mixed_batches)
        self.forwards.labels("sparse").set(engine.sparse_batches)
        self.tasks.set(len(self.bank.names()))
        self.loaded.set(len(self.bank.loaded_names()))
        self.loaded_bytes.set(self.bank.loaded_bytes())
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _route(path: str) -> str:
    """The route a path took, from a fixed set (a label per raw path would grow without bound)."""
    parts = path.strip("/").split("/")
    if parts[0] == "tasks" and len(parts) == 2:
        return "/tasks/rescan" if parts[1] == "rescan" else "/tasks/{name}"
    if parts[0] == "tasks" and len(parts) == 3 and parts[2] == "predict":
        return "/tasks/{name}/predict"
    if len(parts) == 1 and parts[0] in ("health", "tasks", "metrics", "openapi.json", "docs"):
        return "/" + parts[0]
    return "other"
