"""Delta codecs (fedcore.payload.codecs) on a real paper-fmnist delta: encode and decode MB/s of float32 input per
codec, the compression ratio against float32 and the relative error, beside today's float32 payload path.

The delta is real: paper-fmnist trained for a few Adam steps at the paper's lr (1e-4) on Fashion-MNIST with
the worker's trainer (fedcore.model.training.LocalTrainer), less its initial weights; every tensor of the
model (all three parts). Each codec encodes and decodes all the tensors in one call (`encode_all`,
`decode_all`, which checks every field of every tensor, as a receiver does), and decodes them one call per
tensor too (`<codec>_decode_each_mb_s`, `<codec>_decode_all_vs_each`). The reference is the float32 payload
as sent today, on the same delta in the same run: `fedcore.payload.serialization.encode` (safetensors bytes)
and `PayloadReader.read` (header, schema and finiteness checks, zero-copy views). For some codecs
(ACCEPT_CODECS) the coordinator's whole accept of one update is timed too (`<codec>_accept_ms`, `none` being
today's float32 path; `<codec>_accept_vs_fp32` its median over none's). All sides are timed
round-robin, one pass of each per repeat, so all see the same machine load. Rates are MB (1e6 bytes) of
float32 input per second, the median over the repeats (`*_mb_s`) and the fastest repeat (`*_best_mb_s`: what
the work costs when the machine leaves it alone); `<codec>_encode_vs_fp32_payload` is the codec's median
encode rate over the reference's (likewise for decode). On a CPU shared with other work, `--threads 1` keeps
the small operations of 220 tensors from waiting on a second, descheduled thread.

    python -m bench.codecs --quick
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

import torch

from bench.common import MB, emit, log, machine, median
from fedcore.data.datasets import load_fashion_mnist, to_model_range
from fedcore.federation.engine import Federation, FederationConfig
from fedcore.federation.strategies import Strategy
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import ALL_PARTS
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, serialization
from fedcore.payload.codecs import Codec, Encoded
from fedcore.payload.serialization import PayloadMeta

MODEL = "paper-fmnist"
CODECS = ("none", "bf16", "int8", "int4", "topk:0.1", "topk:0.1+int8", "topk:0.05+int8", "topk:0.01+int8")
ACCEPT_CODECS = ("none", "int8", "int4", "topk:0.05+int8")  # the coordinator's accept per update is timed with these


def real_delta(model: str, steps: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor's change over `steps` Adam steps (lr 1e-4, batch `batch`) on Fashion-MNIST, on the CPU."""
    net = build_model(model, seed=seed)
    before = {name: t.detach().clone() for name, t in net.state_dict().items()}
    trainer = LocalTrainer(net, Schedule(), SpeedConfig(device="cpu"))
    images = to_model_range(torch.from_numpy(load_fashion_mnist().images[: steps * batch]))
    trainer.train(trainer.prepare_data(images), TrainConfig(epochs=1, batch_size=batch, lr=1e-4), seed=seed)
    return {name: (t.detach() - before[name]).contiguous() for name, t in net.state_dict().items()}


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _sides(
    model: str, delta: dict[str, torch.Tensor], parsed: dict[str, Codec], accepting: list[str], repeats: int, encoded: dict[str, dict[str, Encoded]]
) -> dict[str, Callable[[], object]]:
    """Each side's one pass, by name: the float32 payload's encode and decode, each codec's encode (into
    `encoded`), decode of all tensors and of each, and the coordinator's accept for the `accepting` codecs."""
    layout = layout_of(build_model(model, seed=0))
    meta = PayloadMeta("delta", model, 0, ALL_PARTS)
    reader = serialization.PayloadReader(layout, kind="delta")
    payload = bytearray(serialization.encode(delta, meta))
    shapes = {name: tuple(t.shape) for name, t in delta.items()}

    def encode(codec: Codec) -> Callable[[], object]:
        return lambda: encoded.__setitem__(str(codec), codec.encode_all(delta))

    def decode(codec: Codec) -> Callable[[], object]:
        return lambda: codec.decode_all({n: e.tensors for n, e in encoded[str(codec)].items()}, shapes)

    def decode_each(codec: Codec) -> Callable[[], object]:
        return lambda: [e.decode(name=n) for n, e in encoded[str(codec)].items()]

    sides: dict[str, Callable[[], object]] = {
        "fp32_payload_encode": lambda: serialization.encode(delta, meta),
        "fp32_payload_decode": lambda: reader.read(payload, ALL_PARTS),
    }
    for name, codec in parsed.items():
        sides.update({f"{name}_encode": encode(codec), f"{name}_decode": decode(codec), f"{name}_decode_each": decode_each(codec)})
    sides.update({f"{name}_accept": accept(model, delta, parsed[name], calls=repeats + 1) for name in accepting})
    return sides


def _round_robin(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each side per repeat, one pass of each in turn, after one warm-up pass of all."""
    for work in sides.values():  # warm-up; the encodes leave what the decodes read
        work()
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(repeats):
        for side, work in sides.items():
            seconds[side].append(_timed(work))
        log(f"repeat {r + 1}/{repeats}")
    return seconds


def _codec_figures(
    name: str, codec: Codec, delta: dict[str, torch.Tensor], norm: float, encoded: dict[str, Encoded], rate: dict[str, float], best: dict[str, float]
) -> dict[str, object]:
    """One codec's rates, against the float32 payload's too, its size against float32 and its error relative to
    the delta's L2 `norm`."""
    fp32_bytes = sum(t.numel() * 4 for t in delta.values())
    size = sum(e.nbytes for e in encoded.values())
    assert size == sum(codec.encoded_bytes(t.numel()) for t in delta.values())  # the closed form holds
    error = math.sqrt(sum(float((e.decode() - delta[n]).double().square().sum()) for n, e in encoded.items()))
    key = name.replace(":", "_").replace("+", "_")
    return {
        f"{key}_encode_mb_s": rate[f"{name}_encode"],
        f"{key}_encode_best_mb_s": best[f"{name}_encode"],
        f"{key}_decode_mb_s": rate[f"{name}_decode"],
        f"{key}_decode_best_mb_s": best[f"{name}_decode"],
        f"{key}_decode_each_mb_s": rate[f"{name}_decode_each"],
        f"{key}_decode_all_vs_each": rate[f"{name}_decode"] / rate[f"{name}_decode_each"],
        f"{key}_encode_vs_fp32_payload": rate[f"{name}_encode"] / rate["fp32_payload_encode"],
        f"{key}_decode_vs_fp32_payload": rate[f"{name}_decode"] / rate["fp32_payload_decode"],
        f"{key}_ratio_vs_fp32": fp32_bytes / size,
        f"{key}_rel_l2_error": error / norm,
    }


def _accept_figures(name: str, seconds: dict[str, list[float]], accepting: list[str]) -> dict[str, object]:
    """The coordinator's accept of one update with codec `name`, against today's float32 path (`none`)."""
    key = name.replace(":", "_").replace("+", "_")
    return {
        f"{key}_accept_ms": 1e3 * median(seconds[f"{name}_accept"]),
        f"{key}_accept_best_ms": 1e3 * min(seconds[f"{name}_accept"]),
        f"{key}_accept_vs_fp32": median(seconds[f"{name}_accept"]) / median(seconds["none_accept"]) if "none" in accepting else math.nan,
    }


def measure(model: str, delta: dict[str, torch.Tensor], codecs: Sequence[str], repeats: int) -> dict[str, object]:
    """The figures for `delta`, every tensor of `model`: one pass of each side per repeat, round-robin."""
    fp32_bytes = sum(t.numel() * 4 for t in delta.values())
    parsed = {name: Codec.parse(name) for name in codecs}
    accepting = [name for name in parsed if name in ACCEPT_CODECS]
    encoded: dict[str, dict[str, Encoded]] = {}
    seconds = _round_robin(_sides(model, delta, parsed, accepting, repeats, encoded), repeats)

    rate = {side: fp32_bytes / MB / median(s) for side, s in seconds.items()}
    best = {side: fp32_bytes / MB / min(s) for side, s in seconds.items()}
    figures: dict[str, object] = {"model": model, "tensors": len(delta), "fp32_mb": fp32_bytes / MB}
    for side in ("fp32_payload_encode", "fp32_payload_decode"):
        figures.update({f"{side}_mb_s": rate[side], f"{side}_best_mb_s": best[side]})
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))
    for name, codec in parsed.items():
        figures.update(_codec_figures(name, codec, delta, norm, encoded[name], rate, best))
        if name in accepting:
            figures.update(_accept_figures(name, seconds, accepting))
    return figures


def accept(model: str, delta: dict[str, torch.Tensor], codec: Codec, calls: int) -> Callable[[], object]:
    """The coordinator's accept of one update (`OpenRound.accept`: header, schema, every field and the values'
    bound checked, decoded when coded, folded into the round's sums), a new client's each call, of a round of
    `calls` clients of a run with `codec`. The payload is one received buffer, as the coordinator's receiver
    holds it (read, never written)."""
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-4)
    federation = Federation(FederationConfig(Strategy.FULL, model, rounds=1, train=train, compression=codec))
    clients = [f"client-{i}" for i in range(calls)]
    open_round = federation.open_round(federation.plan(clients), dict.fromkeys(clients, 64))
    payload = bytearray(coded.encode(delta, PayloadMeta("delta", model, 0, ALL_PARTS, codec=codec.name)))
    pending = iter(clients)
    return lambda: open_round.accept(next(pending), payload, mean_loss=0.1, images_seen=64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (CPU, about a minute)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=4, help="Adam steps that make the delta (default 4)")
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"comma-separated codec names (default {','.join(CODECS)})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    codecs = [str(Codec.parse(name)) for name in args.codecs.split(",")]
    figures: dict[str, object] = {**machine(), "torch_threads": torch.get_num_threads()}
    log(f"{MODEL}: training {args.steps} steps of {args.batch} images for the delta")
    delta = real_delta(MODEL, args.steps, args.batch, seed=0)
    figures.update({"delta_steps": args.steps, "delta_batch": args.batch})
    figures.update(measure(MODEL, delta, codecs, repeats=9 if args.quick else 25))
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
