"""Weights over the real gRPC path on loopback, against plain TCP on the same bytes.

(a) One worker downloads the broadcast and uploads an update, for a large synthetic model (about 512 MB of
    float32) and for paper-fmnist: payload MB/s per direction, the raw TCP loopback rate measured on the same
    bytes in the same run, their ratio, and the wire overhead (weight-stream message bytes / payload bytes).
(b) K workers (default 8) download the same broadcast and upload at once: aggregate MB/s, and how many times
    the coordinator serialized the broadcast in the round (1 whatever K).

The coordinator runs in its own process (bench.coordinator_proc: the real server, servicer, reassembly,
decoding and streaming aggregation); the workers use the worker's own gRPC client. A download is timed from
the request until the payload is reassembled and its digest checked; an upload until the coordinator has
accepted it (reassembled, digest-checked, decoded, checked and folded into the running average). The large
model runs twice: with BLAKE3 (both ends of this version) and with SHA-256 (a worker that predates BLAKE3).

    python -m bench.transfer --quick
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bench.bare_grpc import BareStream
from bench.common import (
    MB,
    CoordinatorProcess,
    LightWorker,
    delta_payload,
    emit,
    log,
    machine,
    median,
    meta_layout,
    payload_bytes_of,
    random_delta,
    raw_tcp_seconds,
    run_together,
    synthetic_model,
)
from fedcore.model.parts import ALL_PARTS, PART_ORDER
from fedcore.payload.serialization import max_payload_bytes
from fedcore.wire.stream import DIGESTS, StreamHeader
from feddiff.local import metric_value
from service.allocator import tune_for_streaming


@dataclass
class StreamTimes:
    """One worker's transfers, round by round: seconds per round, and the payload bytes moved."""

    down: list[float] = field(default_factory=list)  # payload download and upload
    up: list[float] = field(default_factory=list)
    raw_down: list[float] = field(default_factory=list)  # the same bytes over a raw TCP socket
    raw_up: list[float] = field(default_factory=list)
    bare_down: list[float] = field(default_factory=list)  # and over a bare gRPC stream
    bare_up: list[float] = field(default_factory=list)
    digest: list[float] = field(default_factory=list)  # computing the upload's digest
    hashed_down: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in DIGESTS})  # a bare stream with each digest
    hashed_up: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in DIGESTS})
    payload_down: int = 0
    payload_up: int = 0

    def end_warm_up(self) -> dict[str, float]:
        """Forgets the warm-up round; its download and upload seconds (`cold_*`)."""
        cold = {"cold_download_s": self.down.pop(), "cold_upload_s": self.up.pop()}
        for series in (self.raw_down, self.raw_up, self.bare_down, self.bare_up, self.digest, *self.hashed_down.values(), *self.hashed_up.values()):
            del series[:]
        self.payload_down = self.payload_up = 0
        return cold


def _timed_round(model: str, worker: LightWorker, tensors: Mapping[str, torch.Tensor], max_bytes: int, times: StreamTimes) -> None:
    """One round's download and upload, each timed, then the same bytes over a raw TCP socket."""
    task = worker.next_task()
    assert task is not None
    start = time.perf_counter()
    weights = worker.download(task, max_bytes)
    times.down.append(time.perf_counter() - start)
    times.payload_down += len(weights)
    times.raw_down.append(raw_tcp_seconds(weights))
    del weights
    update = delta_payload(model, task, tensors)
    start = time.perf_counter()
    header = StreamHeader.of(update, worker.client.upload_digest)  # made with the payload, like the broadcast's
    times.digest.append(time.perf_counter() - start)
    start = time.perf_counter()
    worker.upload(task, update, header=header)
    times.up.append(time.perf_counter() - start)
    times.payload_up += len(update)
    times.raw_up.append(raw_tcp_seconds(update))
    del update


def _timed_bare_round(reference: BareStream, times: StreamTimes) -> None:
    """A bare gRPC stream of the same size each way, without a digest and with each."""
    times.bare_down.append(reference.download_seconds())
    times.bare_up.append(reference.upload_seconds())
    for a in DIGESTS:
        times.hashed_down[a].append(reference.download_seconds(a))
        times.hashed_up[a].append(reference.upload_seconds(a))


def _stream_figures(times: StreamTimes, cold: dict[str, float], rounds: int, wire_bytes: int, metrics: dict) -> dict[str, float]:
    """Payload rates against raw TCP on the same bytes, the upload's digest and the wire overhead at both ends
    (`wire_bytes`: the worker's weight-stream message bytes, both ways)."""
    size = times.payload_down / rounds
    size_up = times.payload_up / rounds
    down, up, raw_down, raw_up, digest = times.down, times.up, times.raw_down, times.raw_up, times.digest
    coord_payload = sum(metric_value(metrics, "feddiff_payload_bytes_total", direction=d, part=p.value) for d in ("down", "up") for p in PART_ORDER)
    coord_wire = sum(metric_value(metrics, "feddiff_wire_bytes_total", direction=d) for d in ("down", "up"))
    return {
        "payload_mb": size / MB,
        "download_mb_s": size / median(down) / MB,
        "upload_mb_s": size_up / median(up) / MB,
        "raw_tcp_mb_s": (size + size_up) / (median(raw_down) + median(raw_up)) / MB,
        "download_ratio_vs_raw_tcp": median(raw_down) / median(down),
        "upload_ratio_vs_raw_tcp": median(raw_up) / median(up),
        # both directions together: payload bytes over the time they took, against raw TCP for the same bytes
        "ratio_vs_raw_tcp": (median(raw_down) + median(raw_up)) / (median(down) + median(up)),
        # the sender's digest of the update, made with the payload (like the broadcast's, once per round)
        "upload_digest_ms": median(digest) * 1000,
        "ratio_vs_raw_tcp_with_upload_digest": (median(raw_down) + median(raw_up)) / (median(down) + median(up) + median(digest)),
        "cold_download_mb_s": size / cold["cold_download_s"] / MB,
        "cold_upload_mb_s": size_up / cold["cold_upload_s"] / MB,
        "wire_overhead": wire_bytes / (times.payload_down + times.payload_up),
        "coordinator_wire_overhead": coord_wire / coord_payload if coord_payload else float("nan"),
    }


def _bare_figures(times: StreamTimes) -> dict[str, float]:
    """The same bytes over bare gRPC streams against raw TCP, and feddiff's transfers against them."""
    raw = median(times.raw_down) + median(times.raw_up)
    feddiff = median(times.down) + median(times.up)
    # the same bytes as 1 MiB messages without protobuf fields, header, hash or checks
    figures = {
        "bare_grpc_ratio_vs_raw_tcp": raw / (median(times.bare_down) + median(times.bare_up)),
        "ratio_vs_bare_grpc": (median(times.bare_down) + median(times.bare_up)) / feddiff,
    }
    # the same bare stream with a digest of what is received, as every receiver here must check
    for a in DIGESTS:
        figures[f"bare_grpc_{a}_ratio_vs_raw_tcp"] = raw / (median(times.hashed_down[a]) + median(times.hashed_up[a]))
        figures[f"ratio_vs_bare_grpc_{a}"] = (median(times.hashed_down[a]) + median(times.hashed_up[a])) / feddiff
    return figures


def single_stream(model: str, rounds: int, bare: bool = False, digests: Sequence[str] | None = None) -> dict[str, float]:
    """One worker, `rounds` rounds of plain FedAvg (the whole model both ways) after one warm-up round; medians
    over the rounds. The warm-up round is reported apart (`cold_*`): the first transfer of a process also
    maps the memory both ends reuse afterwards. With `bare`, a bare gRPC stream of the same size is timed in
    each round too (bench.bare_grpc), without a digest and with each. `digests`: as `LightWorker`'s."""
    layout = meta_layout(model)
    max_bytes = max_payload_bytes(layout, ALL_PARTS)
    tensors = random_delta(layout, ALL_PARTS)
    times = StreamTimes()
    reference = BareStream(payload_bytes_of(layout)) if bare else None
    settings = {"model": model, "strategy": "full", "rounds": rounds + 1, "min_workers": 1, "epochs": 1}
    with CoordinatorProcess(settings) as coord:
        worker = LightWorker(coord.address, "bench-0", digests=digests)
        worker.join()
        for i in range(rounds + 1):
            if i == 1:  # the warm-up round is over
                cold = times.end_warm_up()
                worker.wire_down = worker.wire_up = 0
            _timed_round(model, worker, tensors, max_bytes, times)
            if reference is not None:
                _timed_bare_round(reference, times)
        metrics = coord.metrics()
        worker.close()
    if reference is not None:
        reference.close()
    figures = _stream_figures(times, cold, rounds, worker.wire_down + worker.wire_up, metrics)
    if bare:
        figures.update(_bare_figures(times))
    return figures


def digest_rates(size: int = 256 << 20, repeats: int = 3) -> dict[str, float]:
    """GB/s of each payload digest on the same random bytes, one thread, best of `repeats`."""
    data = os.urandom(size)
    figures: dict[str, float] = {}
    for name, make in DIGESTS.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            make().update(data)
            best = min(best, time.perf_counter() - start)
        figures[f"{name}_gb_s"] = size / best / 1e9
    figures["blake3_over_sha256_hash_rate"] = figures["blake3_gb_s"] / figures["sha256_gb_s"]
    return figures


def _one_round(model: str, workers: list[LightWorker], tensors: Mapping[str, torch.Tensor], max_bytes: int) -> tuple[float, float]:
    """One round of `workers` downloading at once, then uploading at once: aggregate payload MB/s of each phase."""
    tasks = [w.train_task() for w in workers]
    sizes = [0] * len(workers)

    def fetch(i: int) -> None:
        sizes[i] = len(workers[i].download(tasks[i], max_bytes))

    seconds = run_together(len(workers), fetch)
    down_rate = sum(sizes) / seconds / MB
    update = delta_payload(model, tasks[0], tensors)  # the same parts and round for every worker
    seconds = run_together(len(workers), lambda i: workers[i].upload(tasks[i], update))
    return down_rate, len(workers) * len(update) / seconds / MB


def broadcast(model: str, k: int, rounds: int) -> dict[str, float]:
    """K workers download the same broadcast, then upload at once; aggregate payload MB/s per phase."""
    layout = meta_layout(model)
    max_bytes = max_payload_bytes(layout, ALL_PARTS)
    tensors = random_delta(layout, ALL_PARTS)
    settings = {"model": model, "strategy": "full", "rounds": rounds, "min_workers": k, "epochs": 1, "max_concurrent_uploads": 2}
    down_rates, up_rates = [], []
    with CoordinatorProcess(settings) as coord:
        workers = [LightWorker(coord.address, f"bench-{i}") for i in range(k)]
        for w in workers:
            w.join()
        for _ in range(rounds):
            down_rate, up_rate = _one_round(model, workers, tensors, max_bytes)
            down_rates.append(down_rate)
            up_rates.append(up_rate)
        deadline = time.monotonic() + 60
        while metric_value(coord.metrics(), "feddiff_round") < rounds and time.monotonic() < deadline:
            time.sleep(0.1)
        serializations = metric_value(coord.metrics(), "bench_weights_serializations_total")
        for w in workers:
            w.close()
    return {
        "broadcast_k": k,
        "broadcast_payload_mb": payload_bytes_of(layout) / MB,
        "broadcast_download_mb_s": median(down_rates),
        "broadcast_upload_mb_s": median(up_rates),
        "broadcast_serializations_per_round": serializations / rounds,
    }


def main() -> int:
    tune_for_streaming()  # this process plays the workers: as `feddiff worker` does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and a smaller broadcast (CPU, under 3 minutes)")
    p.add_argument("--large-mb", type=float, default=512.0, help="size of the large synthetic model")
    p.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default 5, quick 4: medians of a noisy machine)")
    p.add_argument("--k", type=int, default=8, help="workers in the broadcast measurement")
    p.add_argument("--broadcast-mb", type=float, default=None, help="model size for (b) (default 512, quick 64)")
    args = p.parse_args()
    rounds = args.rounds or (4 if args.quick else 5)
    broadcast_mb = args.broadcast_mb or (64.0 if args.quick else 512.0)

    large = synthetic_model(args.large_mb * MB)
    log(f"(a) single stream, large model {large} ({payload_bytes_of(meta_layout(large)) / MB:.0f} MB), {rounds} rounds")
    big = single_stream(large, rounds, bare=True)
    log(f"(a) single stream, {large} again, as a worker that predates BLAKE3 (SHA-256 both ways)")
    legacy = single_stream(large, rounds, digests=())
    log("(a) single stream, paper-fmnist")
    paper = single_stream("paper-fmnist", max(rounds, 5))
    mid = synthetic_model(broadcast_mb * MB)
    log(f"(b) broadcast to {args.k} workers, {mid} ({payload_bytes_of(meta_layout(mid)) / MB:.0f} MB)")
    fan = broadcast(mid, args.k, rounds)

    figures: dict[str, object] = {**machine(), "large_model": large, **digest_rates()}
    figures.update({f"large_{k}": v for k, v in big.items() if k not in ("ratio_vs_raw_tcp", "wire_overhead")})
    figures.update({f"large_sha256_{k}": legacy[k] for k in ("download_ratio_vs_raw_tcp", "upload_ratio_vs_raw_tcp", "upload_digest_ms", "ratio_vs_raw_tcp")})
    figures["large_blake3_over_sha256_ratio"] = big["ratio_vs_raw_tcp"] / legacy["ratio_vs_raw_tcp"]
    figures.update({f"paper_{k}": v for k, v in paper.items()})
    figures.update(fan)
    figures["ratio_vs_raw_tcp"] = big["ratio_vs_raw_tcp"]
    figures["wire_overhead"] = big["wire_overhead"]
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
