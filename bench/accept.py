"""What the coordinator spends on one accepted update, beside the transfer: the per-tensor path it took
in its earlier form (check the schema, a view per tensor, a norm per tensor for NaN/Inf, an add per
tensor) against the path it takes now (`PayloadReader`: the header checked once per distinct header, one
min/max pass for NaN/Inf, the sums added as slices of one buffer), on the same payload in the same process.

    python -m bench.accept --quick
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import emit, log, machine, meta_layout, random_delta
from fedcore.federation.aggregate import RunningAggregate
from fedcore.model.parts import ALL_PARTS
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta


def per_update_ms(model: str, repeats: int) -> dict[str, float]:
    layout = meta_layout(model)
    payload = bytearray(serialization.encode(random_delta(layout, ALL_PARTS), PayloadMeta("delta", model, 0, ALL_PARTS)))
    reader = serialization.PayloadReader(layout, kind="delta", wire_round=0, model=model)
    by_tensor, flat = RunningAggregate(layout, ALL_PARTS), RunningAggregate(layout, ALL_PARTS)

    table = reader.read(payload, ALL_PARTS).table

    def tensor_path() -> None:  # the steps the coordinator took before the reader, one per tensor
        metadata, entries, _ = serialization.read_header(payload)  # remembered by its bytes, as it was
        serialization.PayloadMeta.from_metadata(metadata)
        serialization.check_schema({n: (e.dtype, e.shape) for n, e in entries.items()}, layout.specs(ALL_PARTS))
        tensors = table.tensors(payload)  # a view per tensor
        serialization.check_finite(tensors)  # a norm per tensor
        layout.split_bytes(len(payload), {n: t.numel() * t.element_size() for n, t in tensors.items()})
        by_tensor.fold(tensors, ALL_PARTS, 1.0, checked_finite=True)

    def reader_path() -> None:
        decoded = reader.read(payload, ALL_PARTS)
        flat.fold_decoded(decoded, 1.0)

    times: dict[str, list[float]] = {"tensor": [], "reader": []}
    for path in (tensor_path, reader_path):
        for _ in range(max(3, repeats // 10)):  # warm-up: the reader's first call checks the header
            path()
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, path in (("tensor", tensor_path), ("reader", reader_path)):
            start = time.perf_counter()
            path()
            times[name].append(time.perf_counter() - start)
    assert all(torch.equal(flat._sums[n], by_tensor._sums[n]) for n in by_tensor._sums)  # the same sums
    tensor_ms, reader_ms = (sorted(times[k])[len(times[k]) // 2] * 1000 for k in ("tensor", "reader"))
    return {
        "tensors": len(layout.names(ALL_PARTS)),
        "payload_mb": len(payload) / 1e6,
        "per_tensor_ms": tensor_ms,
        "reader_ms": reader_ms,
        "speedup": tensor_ms / reader_ms,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (CPU, seconds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 200 if args.quick else 1000
    figures: dict[str, object] = {**machine(), "torch_threads": torch.get_num_threads()}
    for model in ("tiny", "paper-fmnist"):
        log(f"{model}: {repeats} updates each way")
        figures.update({f"{model.replace('-', '_')}_{k}": v for k, v in per_update_ms(model, repeats).items()})
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
