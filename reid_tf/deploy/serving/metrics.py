"""reid-serve's Prometheus metrics."""


class Metrics:
    """reid-serve's Prometheus metrics (prometheus_client, one registry per server)."""

    def __init__(self, registry=None):
        import prometheus_client as prometheus

        self.registry = registry or prometheus.CollectorRegistry()
        self.requests = prometheus.Counter(
            "reid_requests", "Requests by route and HTTP status.", ["route", "status"],
            registry=self.registry)
        self.latency = prometheus.Histogram(
            "reid_request_seconds", "Request latency by route, seconds.", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.batch_size = prometheus.Histogram(
            "reid_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry)
        self.queue_depth = prometheus.Gauge(
            "reid_queue_depth", "Images waiting for the model.", registry=self.registry)
        self.gallery_size = prometheus.Gauge(
            "reid_gallery_size", "Entries in the searchable index.", registry=self.registry)
        self.index_staleness = prometheus.Gauge(
            "reid_index_staleness_changes",
            "Committed gallery changes not yet in the persisted index file.",
            registry=self.registry)

    def exposition(self):
        import prometheus_client as prometheus

        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST
