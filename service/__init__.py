"""What the coordinator and worker processes and the command line share outside the pure core: the ports they
listen on, the Prometheus metrics both keep, glibc malloc settings for streaming weights, and the command-line
flags of typed settings."""
