"""A diffusers UNet2DModel federated end to end over gRPC with real processes: the model equals `feddiff
simulate`'s, a worker's personalised model exports as a DDPMPipeline that diffusers loads and samples, and a
run starts from a UNet folder on disk (or refuses one of another architecture at start)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.model.diffusers_unet import DiffusersUNetConfig
from fedcore.model.parts import ALL_PARTS, Part
from fedcore.model.unet import ModelName, build_model, layout_of, preset
from fedcore.payload import serialization
from fedcore.payload.serialization import load_file
from feddiff.cli import main
from feddiff.local import LocalCluster, wait_for_state
from feddiff.models_cli import build_trained, load_trained, personalise
from tests.checkpoints import saved_private
from tests.system.raw_client import RawWorker

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed: pip install 'feddiff[diffusers]'")

# Four processes import torch and diffusers: on a shared 2-core machine the run takes minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

MODEL: ModelName = "diffusers-tiny"
K, R = 2, 2
RUN = ["--model", MODEL, "--strategy", "udec", "--rounds", str(R), "--epochs", "1", "--batch-size", "32", "--seed", "5"]
DATA = ["--max-images", "128"]


@pytest.fixture(scope="module")
def grpc_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """A coordinator and K worker processes, udec, R rounds: the cluster's work dir (checkpoints/, workers/)."""
    workdir = tmp_path_factory.mktemp("diffusers-grpc")
    with LocalCluster(workdir) as cluster:
        coord = cluster.coordinator("--insecure", *RUN, "--min-workers", str(K), "--round-deadline", "1200", "--quorum", "1", ready_timeout=600)
        address = coord.ready["address"]
        workers = cluster.shard_workers(address, K, *DATA, ready_timeout=600)
        wait_for_state(address, "done", timeout=1200, procs=[coord, *workers])
    return workdir


def test_a_grpc_run_equals_the_simulation(grpc_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert main(["simulate", "--num-clients", str(K), *RUN, *DATA, "--threads", "1", "--out-dir", str(out)]) == 0  # in this process: torch is imported

    expected = load_file(out / f"global-r{R:04d}.safetensors")[0]
    got = load_file(grpc_run / "checkpoints" / "final.safetensors")[0]

    assert got.keys() == expected.keys() == layout_of(build_model(MODEL)).specs(ALL_PARTS).keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"the gRPC model differs from the simulation by {worst}"


def test_a_personalised_export_is_a_pipeline_diffusers_loads_and_samples(grpc_run: Path, tmp_path: Path) -> None:
    state_dir = grpc_run / "workers" / "client-1"
    out = tmp_path / "client-1-pipeline"

    code = main(["export", "--checkpoint", str(grpc_run / "checkpoints"), "--worker-state", str(state_dir), "--format", "diffusers", "--out", str(out)])

    assert code == 0
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(out))
    images = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 28, 28, 1) and images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0
    # The exported UNet computes what feddiff's personalised model computes.
    ours = build_trained(personalise(load_trained(grpc_run / "checkpoints"), state_dir)).eval()
    x, t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.equal(pipeline.unet(x, t).sample, ours(x, t))
    # Its encoder and bottleneck are the worker's own, its decoder the global one.
    private, _ = saved_private(state_dir, "private")
    unet = pipeline.unet.state_dict()
    layout = layout_of(build_model(MODEL))
    assert all(torch.equal(unet[k], private[k]) for k in layout.names([Part.ENCODER, Part.BOTTLENECK]))
    final = load_file(grpc_run / "checkpoints" / "final.safetensors")[0]
    assert all(torch.equal(unet[k], final[k]) for k in layout.names([Part.DECODER]))
    scheduler = pipeline.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end, scheduler.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)


def test_the_export_samples_with_feddiff_too(grpc_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "global-pipeline"
    assert main(["export", "--checkpoint", str(grpc_run / "checkpoints"), "--format", "diffusers", "--out", str(out)]) == 0
    common = ["--samples", "2", "--steps", "3", "--seed", "1", "--device", "cpu", "--threads", "1"]

    assert main(["sample", "--checkpoint", str(out), *common, "--out", str(tmp_path / "export.png")]) == 0
    assert main(["sample", "--checkpoint", str(grpc_run / "checkpoints"), *common, "--out", str(tmp_path / "run.png")]) == 0

    assert (tmp_path / "export.png").read_bytes() == (tmp_path / "run.png").read_bytes()


def test_the_paper_unet_is_not_exported_as_a_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcore.payload.serialization import save_file

    save_file(tmp_path / "tiny.safetensors", build_model("tiny", seed=0).state_dict())

    code = main(["export", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--model", "tiny", "--format", "diffusers", "--out", str(tmp_path / "out")])

    assert code == 2
    assert "'tiny' is feddiff's own UNet, for which diffusers has no class; export it with --format feddiff" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- --init-from --------------------------------------------------------------------------------------------


def _saved_unet(folder: Path, **changes: object) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    cfg = preset(MODEL)
    assert isinstance(cfg, DiffusersUNetConfig)
    unet = diffusers.UNet2DModel(**{**cfg.unet_kwargs(), **changes})
    unet.save_pretrained(str(folder))
    return unet.state_dict()


def test_round_one_broadcasts_the_weights_of_init_from(tmp_path: Path) -> None:
    saved = _saved_unet(tmp_path / "pretrained")
    cfg = CoordinatorConfig(
        model=MODEL, strategy="udec", rounds=1, epochs=1, min_workers=1, init_from=str(tmp_path / "pretrained"),
        listen="127.0.0.1:0", metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        import grpc

        with grpc.insecure_channel(coord.address) as channel:
            worker = RawWorker(channel, "w")
            worker.join()
            task = worker.wait_task()
            _, payload = worker.download(task.task_id)
    finally:
        coord.stop(grace=0)

    layout = layout_of(build_model(MODEL))
    received = serialization.decode(payload, layout, kind="weights", parts=ALL_PARTS, wire_round=0, model=MODEL)
    assert received.keys() == saved.keys()
    assert all(torch.equal(received[k], saved[k]) for k in saved)


def test_a_folder_of_another_architecture_is_refused_at_start(tmp_path: Path) -> None:
    _saved_unet(tmp_path / "other", layers_per_block=2)
    cmd = [sys.executable, "-m", "feddiff", "coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1",
           "--model", MODEL, "--init-from", str(tmp_path / "other"), "--checkpoint-dir", str(tmp_path / "ckpt")]  # fmt: skip

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"feddiff coordinator: error: --init-from {tmp_path / 'other'}: not a 'diffusers-tiny' model: config key 'layers_per_block' is 2, "
        "the preset has 1 (tensor 'up_blocks.1.resnets.1.norm1.weight' has shape (32,), expected (24,))"
    )
