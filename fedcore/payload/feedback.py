"""Error feedback: what a lossy delta codec (fedcore.payload.codecs) dropped, added to the next round's delta.

Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel Distributed
Training of Speech DNNs"; with top-k sparsification, Stich et al. 2018, "Sparsified SGD with Memory"; the
general argument, Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedcore.payload.codecs import Codec, Encoded
from fedcore.payload.serialization import largest_magnitude


class ErrorFeedback:
    """Per-tensor residuals of a lossy codec, carried into the next round.

    `compress_all(deltas)` codes c = delta + residual for each tensor and keeps residual = c - decode(code):
    over any number of rounds, the sum of what was sent plus the residual equals the sum of the true deltas, up
    to float32 rounding, so nothing a codec drops is lost, only delayed. The state is a dict of float32
    tensors, one per tensor compressed so far (`state_dict`), for a worker to keep with its private parts;
    residuals live on the device of the deltas they were made from."""

    def __init__(self, codec: Codec, state: Mapping[str, torch.Tensor] | None = None):
        """`state`: a previous `state_dict()`; ValueError for a tensor that is not finite float32."""
        self.codec = codec
        self._residuals: dict[str, torch.Tensor] = {}
        for name, residual in (state or {}).items():
            if residual.dtype != torch.float32 or not math.isfinite(largest_magnitude(residual)):
                raise ValueError(f"error-feedback residual {name!r} is not finite float32 ({residual.dtype})")
            self._residuals[name] = residual

    def compress_all(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, Encoded]:
        """The coded form of each delta plus the residual kept for its name, whose residual becomes what this code
        drops. ValueError when a residual kept has another shape than its delta."""
        corrected = {}
        for name, delta in deltas.items():
            residual = self._residuals.get(name)
            if residual is not None and residual.shape != delta.shape:
                raise ValueError(f"error-feedback residual {name!r} has shape {tuple(residual.shape)}, the delta {tuple(delta.shape)}")
            corrected[name] = delta if residual is None else delta + residual.to(delta.device)
        encoded = self.codec.encode_all(corrected)
        sent = self.codec.decode_all({n: e.tensors for n, e in encoded.items()}, {n: e.shape for n, e in encoded.items()})
        self._residuals.update({name: corrected[name] - sent[name] for name in deltas})
        return encoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> residual, float32, the shape of its tensor."""
        return dict(self._residuals)
