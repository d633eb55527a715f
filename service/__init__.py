"""What the coordinator and worker processes share outside the pure core: the ports they listen on, the Prometheus
metrics both keep, and glibc malloc settings for streaming weights."""
