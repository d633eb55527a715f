"""The worker's Prometheus metrics: its local training and the saves of its private parts, besides the metrics both
processes keep (service.metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.metrics import ProcessMetrics


class Metrics(ProcessMetrics):
    """A worker's metrics in their own registry (a fresh one per test, the process's one in a worker)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r = self.registry
        self.local_loss = Gauge("feddiff_local_loss", "Mean loss of this worker's last local training", registry=r)
        self.train_images = Counter("feddiff_train_images", "Images this worker trained on", registry=r)
        self.train_images_per_second = Gauge("feddiff_train_images_per_second", "Training throughput of this worker's last round", registry=r)
        self.private_state_unsaved = Gauge(
            "feddiff_private_state_unsaved",
            "1 while this worker's newest private parts are held in memory only (a save to its state dir failed; retried)",
            registry=r,
        )
        self.state_saves = Counter(
            "feddiff_state_saves", "Saves of this worker's private parts to its state dir, by outcome (saved, failed)", ["outcome"], registry=r
        )
        for outcome in ("saved", "failed"):
            self.state_saves.labels(outcome)
