"""fedcore: the pure core of feddiff (model, diffusion, strategies, wire format, aggregation)."""

__version__ = "0.1.0"
