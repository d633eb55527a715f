"""A run's initial model built from its seed, and the digest that tells a build equal to the coordinator's.

In a fresh run with coded downloads, version 0 of the shared model is `build_model(preset, seed=seed)`: a client
builds it itself instead of downloading it (the whole model in float32), and checks its build against the
digest the coordinator sends. Another torch version or platform may initialise differently: the digests then
differ, and that client downloads the values (fedcore.federation.engine)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from fedcore.model.parts import PART_ORDER, PartLayout
from fedcore.model.unet import build_model


def state_digest(state: Mapping[str, torch.Tensor], layout: PartLayout) -> str:
    """SHA-256 of a whole model as float32, 64 lowercase hex digits: for each tensor in the layout's order, its
    name (UTF-8), a NUL byte, and its values' bytes (float32, C order, this machine's byte order: little-endian
    on every platform torch supports)."""
    h = hashlib.sha256()
    for name in layout.names(PART_ORDER):
        h.update(name.encode())
        h.update(b"\0")
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def initial_state(model: str, seed: int) -> dict[str, torch.Tensor]:
    """The initial model of a run of preset `model` seeded with `seed`, on the CPU as float32 (the coordinator's
    global model before round 1). ModelUnavailable when the preset's backbone is not installed."""
    return {name: t.detach().float().clone() for name, t in build_model(model, seed=seed).state_dict().items()}
