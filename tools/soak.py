"""`make soak`: endurance. 50 rounds of the tiny model with 4 worker processes on loopback; the coordinator's
resident memory is sampled after every round and must grow by less than 10% from round 5 to round 50."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import psutil

from fedcore.federation.roundlog import ROUNDS_LOG, round_records
from feddiff.local import LocalCluster, wait_for_state

K = 4
BASELINE_ROUND = 5  # after warm-up: imports, first payloads, thread pools and allocator arenas are in place


def completed_rounds(checkpoint_dir: Path) -> int:
    """Rounds in the coordinator's round log so far (a line being written is not counted yet)."""
    return len(round_records(checkpoint_dir / ROUNDS_LOG))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/soak"))
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--max-growth", type=float, default=0.10, help="largest RSS growth allowed, as a fraction")
    parser.add_argument("--max-images", type=int, default=256, help="Fashion-MNIST images shared by the workers")
    args = parser.parse_args()
    if args.rounds <= BASELINE_ROUND:
        parser.error(f"--rounds must exceed {BASELINE_ROUND}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    started = time.perf_counter()
    run = ["--model", "tiny", "--strategy", "udec", "--rounds", str(args.rounds), "--epochs", "1", "--batch-size", "32"]
    rss: dict[int, int] = {}  # completed rounds -> coordinator RSS in bytes
    with LocalCluster(args.workdir, env={"OMP_NUM_THREADS": "1"}) as cluster:
        coord = cluster.coordinator("--insecure", *run, "--min-workers", str(K), "--round-deadline", "120", "--progress", "off")
        address = coord.ready["address"]
        process = psutil.Process(coord.proc.pid)
        workers = cluster.shard_workers(address, K, "--max-images", str(args.max_images), "--progress", "off")
        checkpoints = args.workdir / "checkpoints"
        seen = 0
        while seen < args.rounds:
            for p in (coord, *workers):
                if p.proc.poll() is not None:
                    print(f"soak: {p.name} exited with {p.proc.returncode}:\n{p.output()[-3000:]}", file=sys.stderr)
                    return 1
            done = completed_rounds(checkpoints)
            if done > seen:
                seen = done
                rss[seen] = process.memory_info().rss
                if seen % 5 == 0:
                    print(f"round {seen:3d}: coordinator RSS {rss[seen] / 2**20:7.1f} MiB ({time.perf_counter() - started:5.0f}s)", flush=True)
            time.sleep(0.05)
        wait_for_state(address, "done", timeout=60, procs=[coord, *workers])
        rss_done = process.memory_info().rss
    base, last = rss[BASELINE_ROUND], rss[args.rounds]
    growth = last / base - 1
    summary = {
        "rounds": args.rounds,
        "workers": K,
        "rss_mib": {str(BASELINE_ROUND): round(base / 2**20, 1), str(args.rounds): round(last / 2**20, 1), "done": round(rss_done / 2**20, 1)},
        "growth": round(growth, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.workdir / "soak.json").write_text(json.dumps({**summary, "rss_by_round": rss}, indent=2) + "\n")
    ok = growth < args.max_growth
    print(
        f"soak: coordinator RSS {base / 2**20:.1f} MiB at round {BASELINE_ROUND}, {last / 2**20:.1f} MiB at round {args.rounds}: "
        f"{growth:+.1%} (limit {args.max_growth:.0%}); {summary['seconds']:.0f}s: {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
