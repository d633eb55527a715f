"""Peak memory of the coordinator while K workers upload a large update at once.

For each K (default 4, 16, 32) a fresh coordinator process (bench.coordinator_proc: the real server) runs one
round of plain FedAvg on a synthetic model whose update is about 256 MB of float32. Once every worker holds
its task, the coordinator's RSS is its idle level (the global model, the cached broadcast and the running
sum are already there); its peak RSS is then reset (`/proc/PID/clear_refs`), the K workers upload at once,
and the peak (VmHWM) is read after the round has closed and been checkpointed. The figure is
(peak - idle) / update size: streaming aggregation with a bounded number of updates buffered at once keeps
it flat in K, where holding every update (as Flower and OpenFL do) would need K.

With `--compression CODEC` the run codes its updates (fedcore.payload.codecs) and the workers upload the coded
delta: the coordinator decodes each into a float32 buffer before folding it, one at a time. The figure stays
relative to one float32 update, the size the coordinator's memory goal is stated in (peak under 3x).

    python -m bench.coordinator_memory --quick
    python -m bench.coordinator_memory --quick --compression int8
"""

from __future__ import annotations

import argparse
import threading
import time

from bench.common import (
    MB,
    CoordinatorProcess,
    LightWorker,
    RssSampler,
    delta_payload,
    emit,
    log,
    machine,
    meta_layout,
    payload_bytes_of,
    peak_rss_bytes,
    random_delta,
    reset_peak_rss,
    rss_bytes,
    synthetic_model,
)
from fedcore.model.parts import ALL_PARTS
from fedcore.payload.codecs import Codec
from feddiff.local import metric_value
from service.allocator import tune_for_streaming


def one_k(model: str, k: int, update: bytes | None, slots: int, compression: str) -> tuple[dict[str, float], bytes]:
    layout = meta_layout(model)
    settings = {"model": model, "strategy": "full", "rounds": 1, "min_workers": k, "epochs": 1, "max_concurrent_uploads": slots, "compression": compression}
    with CoordinatorProcess(settings) as coord:
        workers = [LightWorker(coord.address, f"bench-{i}") for i in range(k)]
        for w in workers:
            w.join()
        tasks = [w.train_task() for w in workers]
        if update is None:
            update = delta_payload(model, tasks[0], random_delta(layout, ALL_PARTS))  # same round and parts for all, coded as the task says
        time.sleep(1.0)  # let the round's setup settle
        idle = rss_bytes(coord.pid)
        exact = reset_peak_rss(coord.pid)
        barrier = threading.Barrier(k + 1)

        def send(i: int) -> None:
            barrier.wait()
            workers[i].upload(tasks[i], update)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        with RssSampler(coord.pid) as sampler:
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            upload_seconds = time.perf_counter() - start
            during_uploads = peak_rss_bytes(coord.pid) if exact else sampler.peak
            deadline = time.monotonic() + 120
            while metric_value(coord.metrics(), "feddiff_round") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the checkpoint of the closed round
        peak = peak_rss_bytes(coord.pid) if exact else sampler.peak
        for w in workers:
            w.close()
    size = payload_bytes_of(layout)  # one float32 update, whatever the codec
    log(
        f"K={k}: idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB (until the last upload was accepted "
        f"{during_uploads / MB:.0f} MB; sampled {sampler.peak / MB:.0f} MB), uploads of {len(update) / MB:.0f} MB each took {upload_seconds:.1f}s"
    )
    return {
        f"k{k}_idle_mb": idle / MB,
        f"k{k}_peak_mb": peak / MB,
        f"k{k}_peak_over_update": (peak - idle) / size,
        f"k{k}_uploads_peak_over_update": (during_uploads - idle) / size,
        f"k{k}_upload_mb_s": k * len(update) / upload_seconds / MB,
    }, update


def _codec(name: str) -> str:
    try:
        return Codec.parse(name).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> int:
    tune_for_streaming()  # this process plays the workers: as `feddiff worker` does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the same K and size (about 70 s on 2 CPU cores)")
    p.add_argument("--update-mb", type=float, default=256.0)
    p.add_argument("--k", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--slots", type=int, default=2, help="the coordinator's max_concurrent_uploads (its default: 2)")
    p.add_argument("--compression", default="none", type=_codec, help="the run's delta codec, e.g. int8 or topk:0.05+int8 (default none)")
    args = p.parse_args()

    model = synthetic_model(args.update_mb * MB)
    size = payload_bytes_of(meta_layout(model))
    log(f"model {model}: update of {size / MB:.0f} MB, K in {args.k}")
    figures: dict[str, object] = {**machine(), "model": model, "update_mb": size / MB, "max_concurrent_uploads": args.slots, "compression": args.compression}
    update = None
    peaks: list[float] = []  # each K's peak RSS growth over the update size
    for k in args.k:
        result, update = one_k(model, k, update, args.slots, args.compression)
        figures.update(result)
        peaks += [v for n, v in result.items() if n.endswith("_peak_over_update")]
    figures["peak_over_update_max"] = max(peaks)
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
