"""Models on disk in and out of feddiff: starting weights read from a diffusers UNet or pipeline folder (or a
feddiff safetensors file) and checked against the preset, and a trained model written as a DDPMPipeline folder.

Layouts (diffusers' `save_pretrained`):
  UNet folder       config.json + diffusion_pytorch_model.safetensors
  pipeline folder   model_index.json, unet/ (a UNet folder), scheduler/scheduler_config.json
Nothing is downloaded: every path is a folder on disk (fedcore.model.diffusers_unet.import_diffusers)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedcore.errors import NonFiniteTensor, NotSafetensors
from fedcore.model.diffusers_unet import DiffusersUNet, DiffusersUNetConfig, build_diffusers_unet, import_diffusers
from fedcore.model.diffusion import DiffusionConfig
from fedcore.model.parts import PART_ORDER, TensorSpec
from fedcore.model.unet import build_model, layout_of, preset
from fedcore.payload.serialization import check_finite, load_file

PIPELINE_INDEX = "model_index.json"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
PIPELINE_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # a pipeline folder's UNet weights
# The scheduler settings that define the noise schedule a model was trained for; all must match feddiff's.
TRAINING_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def scheduler_kwargs(cfg: DiffusionConfig = DiffusionConfig()) -> dict[str, Any]:
    """diffusers' DDPMScheduler with feddiff's schedule and DDPM sampler: linear betas from beta_1 to beta_T over
    T steps, epsilon prediction, posterior variance beta-tilde ("fixed_small"), and no clipping of the predicted
    x_0 (feddiff clamps only the final image, as DDPMPipeline also does), so that its step() is
    fedcore.model.diffusion.ddpm_step."""
    return {
        "num_train_timesteps": cfg.timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "clip_sample": False,
    }


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def first_difference(found: Mapping[str, Any], expected: Mapping[str, Any], keys: Iterable[str] | None = None) -> tuple[str, Any, Any] | None:
    """(key, found value, expected value) of the first config key that differs, in `expected`'s order;
    diffusers' bookkeeping keys (`_class_name`, `_diffusers_version`, ...) are not compared."""
    names = keys if keys is not None else [k for k in {**expected, **found} if not k.startswith("_")]
    for key in names:
        a, b = _jsonable(found.get(key)), _jsonable(expected.get(key))
        if a != b:
            return key, a, b
    return None


def is_diffusers_folder(path: Path) -> bool:
    """A pipeline or UNet folder as diffusers saves them (not a feddiff checkpoint dir)."""
    return (path / PIPELINE_INDEX).is_file() or (path / UNET_CONFIG).is_file()


def unet_folder(path: Path) -> Path:
    """The UNet folder of a pipeline folder or of a UNet folder; ValueError naming `path` otherwise."""
    if (path / PIPELINE_INDEX).is_file():
        return path / "unet"
    if (path / UNET_CONFIG).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    raise ValueError(f"{path}: neither a diffusers pipeline folder ({PIPELINE_INDEX}) nor a UNet folder ({UNET_CONFIG})")


def _check_schedule(path: Path, diffusion: DiffusionConfig) -> None:
    """A pipeline's scheduler must describe the noise schedule feddiff trains with."""
    config_file = path / SCHEDULER_CONFIG
    if not (path / PIPELINE_INDEX).is_file() or not config_file.is_file():
        return
    found = json.loads(config_file.read_text())
    differs = first_difference(found, scheduler_kwargs(diffusion), keys=TRAINING_SCHEDULE_KEYS)
    if differs is not None:
        key, got, want = differs
        raise ValueError(f"{config_file}: scheduler key {key!r} is {got!r}, feddiff trains with {want!r}")


def first_tensor_difference(state: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]) -> str:
    """The first tensor, in the model's order, that is missing or mis-shaped in `state`, then the first one
    `state` has beyond it; "" when the names and shapes are the model's."""
    for name, spec in expected.items():
        if name not in state:
            return f"tensor {name!r} is missing"
        if tuple(state[name].shape) != spec.shape:
            return f"tensor {name!r} has shape {tuple(state[name].shape)}, expected {spec.shape}"
    unknown = [name for name in state if name not in expected]
    return f"tensor {unknown[0]!r} is not part of the model" if unknown else ""


def read_unet_folder(path: str | Path, model: str, diffusion: DiffusionConfig = DiffusionConfig()) -> dict[str, torch.Tensor]:
    """The weights of a diffusers UNet2DModel saved in `path` (a UNet or pipeline folder), as float32 tensors
    named as the `model` preset names them. Refused (ValueError) unless the folder is a UNet2DModel whose config
    is the preset's, key for key (the first differing key is named, with the first differing tensor), whose
    tensors are the preset's, and whose pipeline's scheduler trains on feddiff's noise schedule."""
    path = Path(path)
    cfg = preset(model)
    if not isinstance(cfg, DiffusersUNetConfig):
        raise ValueError(f"model {model!r} is feddiff's own UNet, not a diffusers UNet2DModel: start it from a feddiff .safetensors file")
    folder = unet_folder(path)
    _check_schedule(path, diffusion)
    diffusers = import_diffusers(model)
    try:
        found_config = diffusers.UNet2DModel.load_config(str(folder))
    except OSError as e:  # no config.json there, or not JSON
        raise ValueError(f"{folder}: {str(e).splitlines()[0]}") from None
    if found_config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"{folder}: a {found_config.get('_class_name')!r}, not a UNet2DModel")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    except OSError as e:  # no safetensors weights (feddiff never unpickles a .bin), or a file that is not one
        raise ValueError(f"{folder}: cannot read its weights as safetensors: {str(e).splitlines()[0]}") from None
    expected = build_diffusers_unet(cfg, model)
    state = {k: v.detach().to(torch.float32).clone() for k, v in unet.state_dict().items()}
    specs = layout_of(expected).specs(PART_ORDER)
    differs = first_difference(dict(unet.config), dict(expected.unet.config))
    if differs is not None:
        key, got, want = differs
        tensor = first_tensor_difference(state, specs)
        raise ValueError(f"{folder}: not a {model!r} model: config key {key!r} is {got!r}, the preset has {want!r}" + (f" ({tensor})" if tensor else ""))
    tensor = first_tensor_difference(state, specs)
    if tensor:
        raise ValueError(f"{folder}: not a {model!r} model: {tensor}")
    return state


def read_weights_file(path: str | Path, model: str) -> dict[str, torch.Tensor]:
    """A feddiff safetensors file of `model` (an export, a checkpoint's global-rNNNN or final.safetensors),
    checked against the preset's tensors."""
    tensors, _ = load_file(path)
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    tensor = first_tensor_difference(state, layout_of(build_model(model)).specs(PART_ORDER))
    if tensor:
        raise ValueError(f"{path}: not a {model!r} model: {tensor}")
    return state


def initial_weights(path: str | Path, model: str) -> dict[str, torch.Tensor]:
    """A federation's starting global model: a diffusers UNet or pipeline folder, or a feddiff .safetensors.
    ValueError (FileNotFoundError when `path` is missing) naming --init-from, the flag of every command that
    reads it, and `path`, when it is not a finite model of the `model` preset."""
    path = Path(path)
    try:
        return _initial_weights(path, model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init-from {e}") from None
    except ValueError as e:
        raise ValueError(f"--init-from {e}") from None


def _initial_weights(path: Path, model: str) -> dict[str, torch.Tensor]:
    if path.is_dir():
        state = read_unet_folder(path, model)
    elif path.suffix == ".safetensors" and path.is_file():
        try:
            state = read_weights_file(path, model)
        except NotSafetensors as e:
            raise ValueError(str(e)) from None
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or file")
    else:
        raise ValueError(f"{path}: expected a diffusers UNet or pipeline folder, or a .safetensors file")
    try:
        check_finite(state)
    except NonFiniteTensor as e:
        raise ValueError(f"{path}: {e}") from None
    return state


def write_pipeline(model: DiffusersUNet, out: str | Path, diffusion: DiffusionConfig = DiffusionConfig()) -> Path:
    """`model` as a DDPMPipeline folder that `DDPMPipeline.from_pretrained(out)` loads: model_index.json, the
    UNet's config.json and safetensors weights, and a scheduler_config.json with feddiff's schedule."""
    diffusers = import_diffusers(type(model.config).__name__)
    scheduler = diffusers.DDPMScheduler(**scheduler_kwargs(diffusion))
    pipeline = diffusers.DDPMPipeline(unet=model.unet, scheduler=scheduler)
    out = Path(out)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    return out
