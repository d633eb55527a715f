"""diffusers' UNet2DModel as a feddiff backbone: presets, part rule, the schedule and one DDPM step against
diffusers' DDPMScheduler, starting weights read from folders, and a core that runs without diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcore.federation.strategies import Strategy, account
from fedcore.model.diffusers_unet import DiffusersUNet, DiffusersUNetConfig
from fedcore.model.diffusion import Schedule, ddpm_step
from fedcore.model.parts import PART_ORDER, Part
from fedcore.model.unet import PRESETS, build_model, layout_of, preset
from fedcore.payload.pretrained import initial_weights, read_unet_folder, scheduler_kwargs, write_pipeline
from feddiff.cli import main

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed: pip install 'feddiff[diffusers]'")

REPO = Path(__file__).resolve().parents[3]
TINY = "diffusers-tiny"


def _config(name: str = TINY) -> DiffusersUNetConfig:
    cfg = preset(name)
    assert isinstance(cfg, DiffusersUNetConfig)
    return cfg


def _model(name: str = TINY, seed: int | None = None) -> DiffusersUNet:
    model = build_model(name, seed=seed)
    assert isinstance(model, DiffusersUNet)
    return model


def saved_unet(folder: Path, seed: int = 1, **changes: object) -> dict[str, torch.Tensor]:
    """A randomly initialised UNet2DModel of the tiny preset (with `changes`), saved as diffusers saves it."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**_config().unet_kwargs(), **changes})
    unet.save_pretrained(str(folder))
    return unet.state_dict()


# --- presets and parts --------------------------------------------------------------------------------------


def test_ddpm_cifar10_is_ho_et_al_as_diffusers_publishes_it() -> None:
    model = _model("ddpm-cifar10", seed=0)

    layout = layout_of(model)

    assert layout.total == sum(p.numel() for p in model.parameters()) == 35_746_307
    assert layout.sizes == {Part.ENCODER: 10_523_008, Part.BOTTLENECK: 2_888_704, Part.DECODER: 22_334_595}
    cfg = model.unet.config
    assert (cfg["sample_size"], cfg["in_channels"], list(cfg["block_out_channels"]), cfg["downsample_padding"]) == (32, 3, [128, 256, 256, 256], 0)
    assert (cfg["flip_sin_to_cos"], cfg["freq_shift"], cfg["norm_eps"], cfg["attention_head_dim"]) == (False, 1, 1e-6, None)


@pytest.mark.parametrize("name", ["diffusers-tiny", "diffusers-fmnist"])
def test_the_part_rule_maps_diffusers_modules_to_encoder_bottleneck_decoder(name: str) -> None:
    model = _model(name, seed=0)

    layout = layout_of(model)

    heads = {p: {n.split(".", 1)[0] for n in layout.names([p])} for p in PART_ORDER}
    assert heads == {
        Part.ENCODER: {"conv_in", "time_embedding", "down_blocks"},
        Part.BOTTLENECK: {"mid_block"},
        Part.DECODER: {"up_blocks", "conv_norm_out", "conv_out"},
    }
    assert list(model.state_dict()) == list(model.unet.state_dict())  # diffusers' own names
    assert layout.total == sum(p.numel() for p in model.parameters())


def test_the_tiny_preset_is_small_and_fits_fashion_mnist() -> None:
    cfg = preset(TINY)
    model = build_model(TINY, seed=0)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])

    out = model(x, t)

    assert isinstance(model, DiffusersUNet) and isinstance(model.unet, diffusers.UNet2DModel)
    assert layout_of(model).total == 71_033
    assert (cfg.channels, cfg.image_size) == (1, 28)
    assert out.shape == x.shape
    assert torch.equal(out, model.unet(x, t).sample)


def test_a_seed_gives_the_same_weights() -> None:
    a, b = build_model(TINY, seed=3).state_dict(), build_model(TINY, seed=3).state_dict()

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], build_model(TINY, seed=4).state_dict()["conv_in.weight"])


def test_train_and_eval_reach_the_unet() -> None:
    model = _model()

    model.eval()
    assert not model.unet.training and not any(m.training for m in model.modules())
    model.train()
    assert model.unet.training


def test_model_info_and_strategies_report_a_diffusers_preset(capsys: pytest.CaptureFixture[str]) -> None:
    sizes = layout_of(build_model(TINY)).sizes

    assert main(["model-info", "--model", TINY, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["strategies", "--model", TINY, "--num-clients", "3", "--rounds", "2", "--json"]) == 0
    rows = {r["strategy"]: r for r in json.loads(capsys.readouterr().out)}

    assert info == {"model": TINY, "total": sum(sizes.values()), "parts": {p.value: n for p, n in sizes.items()}}
    accounted = account(Strategy.UDEC, sizes, 3, 2, seed=0).as_json()
    assert {k: rows["udec"][k] for k in accounted} == accounted  # and the bytes of the codec (none)
    assert rows["udec"]["parameters_total"] == 3 * (sum(sizes.values()) + sizes[Part.DECODER]) + 3 * 2 * sizes[Part.DECODER]


# --- schedules ----------------------------------------------------------------------------------------------


def test_the_schedule_is_diffusers_ddpm_scheduler_s() -> None:
    ours = Schedule()
    theirs = diffusers.DDPMScheduler(**scheduler_kwargs())

    # diffusers keeps its schedule in float32, feddiff in float64: they agree to float32's rounding. The betas
    # (torch.linspace in float32 against float64) to float32's relative precision, the alphas to one float32
    # step below 1, the cumulative products to the rounding of 1000 float32 products. The formulas that use
    # them agree to float64 precision (the tests below, on feddiff's float64 schedule).
    assert theirs.config.num_train_timesteps == ours.timesteps == 1000
    assert torch.allclose(theirs.betas.double(), ours.betas, rtol=2**-23, atol=0)
    assert float((theirs.alphas.double() - ours.alphas).abs().max()) <= 2**-24
    assert torch.allclose(theirs.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-6, atol=0)


def _float64_scheduler(schedule: Schedule):  # -> diffusers.DDPMScheduler
    """diffusers' DDPMScheduler computing in float64 on feddiff's schedule: its formulas, not its float32 rounding."""
    scheduler = diffusers.DDPMScheduler(**scheduler_kwargs())
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(schedule.timesteps)
    return scheduler


def test_the_posterior_variance_is_diffusers_fixed_small_variance() -> None:
    ours = Schedule()
    theirs = _float64_scheduler(ours)

    variance = torch.stack([theirs._get_variance(t) for t in range(1, 1000)])

    assert torch.allclose(variance, ours.posterior_variance[1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("i", [999, 500, 1, 0])
def test_one_denoising_step_is_diffusers_step(i: int) -> None:
    ours = Schedule()
    g = torch.Generator().manual_seed(i)
    x, eps = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64), torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if i > 0 else None

    expected = _float64_scheduler(ours).step(eps, i, x, generator=torch.Generator().manual_seed(7)).prev_sample
    got = ddpm_step(ours, x, eps, i, noise)

    # The same step, through eq. 11 here and through the predicted x_0 (eqs. 15 and 7) there.
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), float((got - expected).abs().max())


@pytest.mark.parametrize("i", [999, 500, 1, 0])
def test_one_float32_step_agrees_with_diffusers_to_its_rounding(i: int) -> None:
    ours, theirs = Schedule(), diffusers.DDPMScheduler(**scheduler_kwargs())
    theirs.set_timesteps(1000)
    g = torch.Generator().manual_seed(i)
    x, eps = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) if i > 0 else None

    expected = theirs.step(eps, i, x, generator=torch.Generator().manual_seed(7)).prev_sample
    got = ddpm_step(ours, x, eps, i, noise)

    # diffusers forms beta_t = 1 - abar_t / abar_(t-1) in float32: about 1e-4 of relative error at small t.
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-5), float((got - expected).abs().max())


# --- starting weights from folders --------------------------------------------------------------------------


def test_a_saved_unet_folder_is_read_as_the_preset_s_weights(tmp_path: Path) -> None:
    saved = saved_unet(tmp_path / "unet")

    state = read_unet_folder(tmp_path / "unet", TINY)

    assert state.keys() == saved.keys() == layout_of(build_model(TINY)).specs(PART_ORDER).keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_a_pipeline_folder_is_read_through_its_unet(tmp_path: Path) -> None:
    model = _model(seed=5)
    write_pipeline(model, tmp_path / "pipe")

    state = initial_weights(tmp_path / "pipe", TINY)

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_folder_of_another_architecture_is_refused_naming_the_first_differing_key(tmp_path: Path) -> None:
    saved_unet(tmp_path / "wider", block_out_channels=(8, 16, 32))

    with pytest.raises(ValueError) as refused:
        read_unet_folder(tmp_path / "wider", TINY)

    assert str(refused.value) == (
        f"{tmp_path / 'wider'}: not a 'diffusers-tiny' model: config key 'block_out_channels' is [8, 16, 32], the preset has "
        "[8, 16, 16] (tensor 'down_blocks.2.resnets.0.conv1.weight' has shape (32, 16, 3, 3), expected (16, 16, 3, 3))"
    )


def test_a_folder_that_differs_only_in_a_setting_is_refused_too(tmp_path: Path) -> None:
    saved_unet(tmp_path / "eps", norm_eps=1e-6)

    with pytest.raises(ValueError, match=r"config key 'norm_eps' is 1e-06, the preset has 1e-05$"):
        read_unet_folder(tmp_path / "eps", TINY)


def test_a_pipeline_trained_on_another_schedule_is_refused(tmp_path: Path) -> None:
    write_pipeline(_model(), tmp_path / "pipe")
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_schedule": "squaredcos_cap_v2"}))

    with pytest.raises(ValueError, match=r"scheduler key 'beta_schedule' is 'squaredcos_cap_v2', feddiff trains with 'linear'"):
        initial_weights(tmp_path / "pipe", TINY)


def test_pickled_weights_are_never_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    torch.manual_seed(0)
    diffusers.UNet2DModel(**_config().unet_kwargs()).save_pretrained(str(folder), safe_serialization=False)

    with pytest.raises(ValueError, match="cannot read its weights as safetensors"):
        read_unet_folder(folder, TINY)


def test_the_paper_unet_starts_from_a_feddiff_file_not_a_diffusers_folder(tmp_path: Path) -> None:
    from fedcore.payload.serialization import save_file

    saved_unet(tmp_path / "unet")
    weights = build_model("tiny", seed=9).state_dict()
    save_file(tmp_path / "tiny.safetensors", weights)

    with pytest.raises(ValueError, match="'tiny' is feddiff's own UNet, not a diffusers UNet2DModel"):
        initial_weights(tmp_path / "unet", "tiny")
    state = initial_weights(tmp_path / "tiny.safetensors", "tiny")
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match=r"not a 'diffusers-tiny' model: tensor 'conv_in.weight' is missing"):
        initial_weights(tmp_path / "tiny.safetensors", TINY)
    with pytest.raises(FileNotFoundError):
        initial_weights(tmp_path / "nowhere", TINY)


def test_a_simulation_starts_from_init_from(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    from fedcore.data.shards import SplitConfig
    from fedcore.experiments.simulation import Simulation, SimulationConfig
    from fedcore.federation.engine import FederationConfig
    from fedcore.model.training import SpeedConfig

    saved = saved_unet(tmp_path / "unet")
    cfg = SimulationConfig(
        federation=FederationConfig(Strategy.UDEC, TINY, rounds=1),
        data=SplitConfig(num_clients=2, max_images=64, data_root=str(fashion_mnist_dir)),
        speed=SpeedConfig(device="cpu", compile="off"),
        init_from=str(tmp_path / "unet"),
    )

    sim = Simulation.create(cfg, tmp_path / "run", log=lambda _: None)

    assert all(torch.equal(sim.federation.global_state[k], saved[k]) for k in saved)


def test_starting_weights_with_nan_are_refused(tmp_path: Path) -> None:
    from fedcore.payload.serialization import save_file

    weights = build_model("tiny", seed=0).state_dict()
    weights["final_conv.bias"][0] = float("nan")
    save_file(tmp_path / "nan.safetensors", weights)

    with pytest.raises(ValueError, match=r"nan.safetensors: tensor 'final_conv.bias' holds 1 NaN/Inf values$"):
        initial_weights(tmp_path / "nan.safetensors", "tiny")


# --- without diffusers --------------------------------------------------------------------------------------

WITHOUT_DIFFUSERS = "import sys; sys.modules['diffusers'] = None  # import diffusers raises ImportError\n"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_DIFFUSERS + code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_the_core_coordinator_and_worker_run_without_diffusers() -> None:
    result = _python(
        "import coordinator.server, worker.daemon, feddiff.cli\n"
        "from fedcore.model.unet import build_model, layout_of\n"
        "from fedcore.errors import ModelUnavailable\n"
        "assert layout_of(build_model('tiny')).total == 143_951\n"
        "try:\n    build_model('diffusers-tiny')\nexcept ModelUnavailable as e:\n    print(e.reason, e)\n"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model_unavailable model 'diffusers-tiny' is a diffusers UNet2DModel, but diffusers is not installed")
    assert "pip install 'feddiff[diffusers]'" in result.stdout


def test_a_diffusers_preset_without_diffusers_is_one_line_naming_the_extra() -> None:
    result = _python("from feddiff.cli import main\nsys.exit(main(['model-info', '--model', 'diffusers-tiny']))")

    assert result.returncode == 2
    assert result.stderr.startswith("feddiff model-info: error: model 'diffusers-tiny' is a diffusers UNet2DModel")
    assert result.stderr.rstrip().endswith("install feddiff's optional dependency with pip install 'feddiff[diffusers]'")
    assert len(result.stderr.splitlines()) == 1


def test_the_cli_names_every_preset() -> None:
    from typing import get_args

    from fedcore.model.unet import ModelName
    from feddiff.cli import build_parser
    from tests.parsers import subcommands

    (model,) = [a for a in subcommands(build_parser())["model-info"]._actions if a.dest == "model"]
    assert list(model.choices or ()) == list(get_args(ModelName)) == list(PRESETS)
