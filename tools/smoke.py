"""`make smoke`: a coordinator and 2 workers as processes on loopback (tiny model, 2 rounds of udec); scrapes
both sides' /metrics over HTTP and fails unless the parameter counters equal fedcore's accounting."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from fedcore.federation.strategies import Strategy, account
from fedcore.model.parts import PART_ORDER
from fedcore.model.unet import build_model, layout_of
from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state

K, R, SEED = 2, 2, 0
READY_SECONDS = 300.0  # a process's start (torch's import, the images, the model) on a busy machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/smoke"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.perf_counter()
    run = ["--model", "tiny", "--strategy", "udec", "--rounds", str(R), "--epochs", "1", "--seed", str(SEED)]
    try:
        sides = _run(args.workdir, run)
    except (RuntimeError, TimeoutError) as e:  # a process that failed to start or to finish: what it logged
        print(f"smoke: FAILED: {e}", file=sys.stderr)
        return 1

    acct = account(Strategy.UDEC, layout_of(build_model("tiny")).sizes, K, R, seed=SEED)
    failures = []
    for direction, counts in (("down", acct.traffic.down), ("up", acct.traffic.up)):
        for part in PART_ORDER:
            want = counts[part]
            got = metric_value(sides["coordinator"], "feddiff_parameters_total", direction=direction, part=part.value)
            on_workers = sum(metric_value(m, "feddiff_parameters_total", direction=direction, part=part.value) for n, m in sides.items() if n != "coordinator")
            print(f"parameters {direction:<4} {part.value:<10} accounting {want:>8}  coordinator {got:>10.0f}  workers {on_workers:>10.0f}")
            if got != want or on_workers != want:
                failures.append(f"{direction}/{part.value}")
    full = metric_value(sides["coordinator"], "feddiff_full_fedavg_parameters_total")
    reduction = 1 - acct.traffic.total / acct.full_fedavg
    print(f"reduction vs plain FedAvg: {reduction:.1%} (full FedAvg {full:.0f} parameters, accounting {acct.full_fedavg})")
    if full != acct.full_fedavg:
        failures.append("full_fedavg")
    print(f"smoke: {'FAILED ' + ', '.join(failures) if failures else 'ok'} in {time.perf_counter() - started:.1f}s")
    return 1 if failures else 0


def _run(workdir: Path, run: list[str]) -> dict[str, dict]:
    """The run on a coordinator and K workers as processes; each one's last /metrics, by name."""
    with LocalCluster(workdir) as cluster:
        coord = cluster.coordinator("--insecure", *run, "--min-workers", str(K), "--round-deadline", "90", ready_timeout=READY_SECONDS)
        address = coord.ready["address"]
        workers = cluster.shard_workers(address, K, "--max-images", "512", ready_timeout=READY_SECONDS)
        wait_for_state(address, "done", timeout=100, procs=[coord, *workers])
        sides = {"coordinator": scrape(coord.ready["metrics_port"])}
        sides.update({w.name: scrape(w.ready["metrics_port"]) for w in workers})
    return sides


if __name__ == "__main__":
    sys.exit(main())
