"""`feddiff export`, `sample` and `evaluate`: a trained model out of its checkpoint, as a file, a diffusers
pipeline folder, a grid of images or a Frechet distance.

Where a model comes from:
  a checkpoint dir    the coordinator's `final.safetensors`, else the committed `global-rNNNN` (state.json),
                      else the newest `global-rNNNN`; the run's config in state.json names the model preset
  a .safetensors file one written by `feddiff export` (its metadata carries the export config), or a
                      `global-rNNNN` inside a checkpoint dir
  a diffusers folder  one written by `feddiff export --format diffusers` (its feddiff_export.json says what it
                      is), or any UNet2DModel or DDPMPipeline folder of a preset's architecture (with --model)
  --worker-state DIR  makes it personalised: the global model's shared parts with the private parts that a
                      worker keeps in its --state-dir (udec, ulatdec); fedcore.federation.checkpoint.personalised_state
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Interval

from fedcore import settings
from fedcore.federation.checkpoint import (
    FINAL_MODEL,
    PREVIOUS_RUNS,
    RunState,
    check_not_run_file,
    global_file_name,
    global_versions,
    load_private,
    load_run_id,
    load_state,
    personalised_state,
    run_in,
)
from fedcore.model.diffusion import SamplerKind, SamplingSpec
from fedcore.model.training import Device
from fedcore.model.unet import ModelName
from fedcore.settings import EvalSamples, ExistingFile, ExistingFolder, ExistingPath, NonNegative, ProgressMode, SamplingSteps, Seed, Threads
from feddiff.args import Command, check_file_path, check_folder_path
from feddiff.progress import SamplingBar
from service import flags

if TYPE_CHECKING:
    import torch

    from fedcore.evaluation.extractors import FeatureExtractor
    from fedcore.evaluation.fid import ReferenceStats
    from fedcore.model.denoiser import Denoiser

ModelKind = Literal["global", "personalised"]
ExportFormat = Literal["feddiff", "diffusers"]  # safetensors + JSON config, or a diffusers DDPMPipeline folder

EXPORT_FORMAT = "feddiff-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_METADATA_KEY = "feddiff_export"  # safetensors metadata: the export config as JSON
WORKER_PRIVATE_STEM = "private"  # a worker daemon's private parts: <state-dir>/private-rNNNN.safetensors
WORKER_IDENTITY_FILE = "identity.json"  # {"worker_id": ...} in a worker's --state-dir
EXPORT_CONFIG_FILE = "feddiff_export.json"  # the export config in a `--format diffusers` folder
GRID_IMAGES = 64  # evaluate --grid: the first samples, 8 to a row
FEW_SAMPLES = 1000  # an FD from fewer samples is biased upward (Heusel et al. 2017 use 50,000; the paper about 1,000)
PRIVATE_FILE = re.compile(r"(private|client-\d+)-r\d{4,}\.safetensors")  # a worker's or a simulated client's private parts
PARTS_FILE = re.compile(r"(private|residual|client-\d+)-r\d{4,}\.safetensors")  # the same, or their error-feedback residuals


@dataclass(frozen=True)
class TrainedModel:
    """A model's weights and what is known about where they came from."""

    tensors: dict[str, torch.Tensor]  # the full state dict of the UNet
    model: str  # model preset name
    strategy: str | None  # the run's strategy, when recorded
    completed_rounds: int | None  # rounds of the run behind these weights, when recorded
    kind: ModelKind = "global"
    worker: str | None = None  # whose private parts, for a personalised model
    private_round: int | None = None  # the round count the private parts belong to
    run_id: str | None = None  # the run behind these weights, when recorded (a checkpoint dir's run.json)

    def describe(self) -> str:
        who = f"{self.worker}'s personalised" if self.kind == "personalised" else "the global"
        n = self.completed_rounds
        rounds = f" after {n} round{'' if n == 1 else 's'}" if n is not None else ""
        return f"{who} {self.model} model{rounds}" + (f" ({self.strategy})" if self.strategy else "")


# --- loading ------------------------------------------------------------------------------------------------


def _preset_name(given: str, state: RunState | None, where: Path) -> str:
    recorded = state.config.model if state else ""
    if given and recorded and given != recorded:
        raise ValueError(f"--model {given!r}, but {where} holds a run of {recorded!r}")
    if not (given or recorded):
        raise ValueError(f"{where}: no state.json names the model preset; pass --model")
    return given or recorded


def _from_checkpoint_dir(directory: Path, model: str) -> TrainedModel:
    from fedcore.payload.serialization import load_file

    state = load_state(directory)
    final = directory / FINAL_MODEL
    if state is None and not final.is_file() and not global_versions(directory):
        raise FileNotFoundError(f"--checkpoint {directory}: no {FINAL_MODEL}, state.json or global-rNNNN.safetensors: not a run's folder")
    name = _preset_name(model, state, directory)
    committed = state.completed_rounds if state else None
    run_id = load_run_id(directory)
    if final.is_file():
        tensors, md = load_file(final)
        rounds = int(md["completed_rounds"]) if "completed_rounds" in md else committed
        if committed is None or (rounds is not None and rounds >= committed):
            return TrainedModel(tensors, name, _strategy(state), rounds, run_id=run_id)
    if state is not None:
        tensors, _ = load_file(directory / state.global_file)
        return TrainedModel(tensors, name, _strategy(state), committed, run_id=run_id)
    versions = global_versions(directory)
    tensors, _ = load_file(directory / global_file_name(versions[-1]))
    return TrainedModel(tensors, name, None, versions[-1], run_id=run_id)


def _strategy(state: RunState | None) -> str | None:
    return state.config.strategy if state else None


def _from_file(path: Path, model: str) -> TrainedModel:
    from fedcore.errors import NotSafetensors
    from fedcore.payload.serialization import load_file

    try:
        tensors, md = load_file(path)
    except NotSafetensors as e:
        raise ValueError(f"--checkpoint {e}") from None
    private = PRIVATE_FILE.fullmatch(path.name)
    if private and EXPORT_METADATA_KEY not in md and load_state(path.parent) is None:
        raise ValueError(
            f"--checkpoint {path}: the private parts of one client, not a whole model; give the run's folder as --checkpoint "
            f"and {str(path.parent)!r} as --worker-state (with --private-stem {private.group(1)})"
        )
    if EXPORT_METADATA_KEY in md:  # written by `feddiff export`
        cfg = json.loads(md[EXPORT_METADATA_KEY])
        if model and model != cfg["model"]:
            raise ValueError(f"--model {model!r}, but {path} holds a {cfg['model']!r} model")
        return TrainedModel(tensors, cfg["model"], cfg["strategy"], cfg["completed_rounds"], cfg["kind"], cfg["worker"], cfg["private_round"])
    state = load_state(path.parent)  # a global-rNNNN or final.safetensors inside a checkpoint dir
    rounds = int(md["completed_rounds"]) if "completed_rounds" in md else None
    run_id = load_run_id(path.parent) if state is not None else None
    return TrainedModel(tensors, _preset_name(model, state, path), _strategy(state), rounds, run_id=run_id)


def _from_diffusers_folder(path: Path, model: str) -> TrainedModel:
    """A `--format diffusers` export (its feddiff_export.json says what it is), or any diffusers UNet or
    pipeline folder of a preset's architecture (`model` names the preset)."""
    from fedcore.payload.pretrained import read_unet_folder

    config_file = path / EXPORT_CONFIG_FILE
    if not config_file.is_file():
        if not model:
            raise ValueError(f"{path}: a diffusers folder without {EXPORT_CONFIG_FILE}; pass --model to name its preset")
        return TrainedModel(read_unet_folder(path, model), model, None, None)
    cfg = json.loads(config_file.read_text())
    if model and model != cfg["model"]:
        raise ValueError(f"--model {model!r}, but {path} holds a {cfg['model']!r} model")
    tensors = read_unet_folder(path, cfg["model"])
    return TrainedModel(tensors, cfg["model"], cfg["strategy"], cfg["completed_rounds"], cfg["kind"], cfg["worker"], cfg["private_round"])


def load_trained(checkpoint: str | Path, model: str = "") -> TrainedModel:
    """The global model of a checkpoint dir, the model of a .safetensors file, or that of a diffusers folder
    (an export with --format diffusers); `model` names the preset where nothing recorded it."""
    from fedcore.payload.pretrained import is_diffusers_folder

    path = Path(checkpoint)
    if path.is_dir() and is_diffusers_folder(path):
        return _from_diffusers_folder(path, model)
    if path.is_dir():
        return _from_checkpoint_dir(path, model)
    if path.is_file():
        return _from_file(path, model)
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def personalise(trained: TrainedModel, state_dir: str | Path, stem: str = WORKER_PRIVATE_STEM) -> TrainedModel:
    """The global model's shared parts with a worker's private parts from its --state-dir."""
    from fedcore.federation.strategies import Strategy, private_parts

    if trained.kind == "personalised":
        raise ValueError(f"--worker-state: the model is already {trained.worker}'s personalised one; leave out --worker-state")
    if trained.strategy is not None and not private_parts(Strategy(trained.strategy)):
        raise ValueError(f"strategy {trained.strategy!r} keeps no private parts: every worker's model is the global one")
    state_dir = Path(state_dir)
    found = load_private(_run_folder(state_dir, trained.run_id), stem, trained.completed_rounds)
    if found is None:
        rounds = f" of round {trained.completed_rounds} or earlier" if trained.completed_rounds is not None else ""
        hint = "" if stem != WORKER_PRIVATE_STEM else " (in `feddiff simulate`'s OUT_DIR/clients, name the client with --private-stem client-N)"
        raise FileNotFoundError(f"--worker-state {str(state_dir)!r}: no private parts {stem}-rNNNN.safetensors{rounds}{hint}")
    private_tensors, private_round = found
    identity = state_dir / WORKER_IDENTITY_FILE
    worker = json.loads(identity.read_text())["worker_id"] if identity.is_file() else stem
    tensors = personalised_state(trained.tensors, private_tensors)
    return replace(trained, tensors=tensors, kind="personalised", worker=worker, private_round=private_round)


def _run_folder(state_dir: Path, run_id: str | None) -> Path:
    """Where a worker's --state-dir keeps the private parts of run `run_id`: the state dir itself when they are
    its current run's (or either run is not recorded), else previous-runs/<run id>/; FileNotFoundError naming
    the runs it holds when it holds none of that run's."""
    current = load_run_id(state_dir)
    if run_id is None or current is None or current == run_id:
        return state_dir
    earlier = state_dir / PREVIOUS_RUNS / run_id
    if earlier.is_dir():
        return earlier
    raise FileNotFoundError(f"{state_dir}: no private parts of run {run_id} (the checkpoint's); it holds those of run {current}")


def build_trained(trained: TrainedModel) -> Denoiser:
    """The UNet of the preset with these weights; every tensor's name and shape must match."""
    from fedcore.model.parts import PART_ORDER
    from fedcore.model.unet import build_model, layout_of
    from fedcore.payload.pretrained import first_tensor_difference

    model = build_model(trained.model)
    differs = first_tensor_difference(trained.tensors, layout_of(model).specs(PART_ORDER))
    if differs:
        raise ValueError(f"not a {trained.model!r} model: {differs}")
    model.load_state_dict(trained.tensors)
    return model


# --- export -------------------------------------------------------------------------------------------------


def export_config(trained: TrainedModel, file_name: str) -> dict[str, object]:
    """What `feddiff export` writes beside the weights (and into their metadata)."""
    from fedcore.federation.strategies import Strategy, private_parts
    from fedcore.model.parts import PART_ORDER
    from fedcore.model.unet import build_model, layout_of, preset

    layout = layout_of(build_model(trained.model))
    worker_parts = private_parts(Strategy(trained.strategy)) if trained.kind == "personalised" and trained.strategy else frozenset()
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "weights": file_name,
        "model": trained.model,
        "unet": asdict(preset(trained.model)),  # the preset's UNetConfig or DiffusersUNetConfig fields
        "strategy": trained.strategy,
        "completed_rounds": trained.completed_rounds,
        "kind": trained.kind,
        "worker": trained.worker,
        "private_round": trained.private_round,
        "parameters": layout.total,
        "parts": {p.value: {"parameters": layout.numel(p), "from": "worker" if p in worker_parts else "global"} for p in PART_ORDER},
    }


def export(cfg: ExportConfig) -> int:
    """The model as FILE.safetensors with its config in FILE.json (or, --format diffusers, a pipeline folder)."""
    from fedcore.payload.serialization import save_file

    trained = cfg.source.load(cfg.checkpoint)
    model = build_trained(trained)  # refuse to export weights that do not make the model
    out = Path(cfg.out)
    _check_not_parts_file(out)
    if cfg.format == "diffusers":
        check_folder_path(out, "--out")
        return _export_pipeline(trained, model, out, cfg.force)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors")
    check_file_path(out, "--out")
    check_not_run_file(out, "--out")
    check_not_run_file(out.with_suffix(".json"), "--out")
    for path in (out, out.with_suffix(".json")):
        check_not_replacing(path, cfg.force)
    config = export_config(trained, out.name)
    metadata = {EXPORT_METADATA_KEY: json.dumps(config, sort_keys=True), "model": trained.model, "kind": trained.kind}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, trained.tensors, metadata)
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"exported {trained.describe()}: {out} and {config_path}")
    return 0


def _check_not_parts_file(out: Path) -> None:
    """ValueError for an --out named as a client's versioned parts (PARTS_FILE) in a folder where a run or a
    worker reads them: a simulated run's clients/ or residuals/, or a worker's --state-dir. There the newest
    such file is taken as the client's own parts when the run goes on, so a whole model saved under that name
    would replace them, with --force or without."""
    from fedcore.experiments.simulation import CLIENTS, RESIDUALS

    folder = out.parent
    parts = PARTS_FILE.fullmatch(out.name)
    if parts is None:
        return
    if (folder / WORKER_IDENTITY_FILE).is_file():
        where = f"a worker's --state-dir ({WORKER_IDENTITY_FILE})"
    elif folder.name in (CLIENTS, RESIDUALS) and (found := run_in(folder.parent)):
        where = f"the {folder.name} folder of the run in {str(folder.parent)!r} ({found})"
    else:
        return
    raise ValueError(
        f"--out {str(out)!r}: {parts.group(1)}-rNNNN.safetensors in {where} names a client's own parts, which the run "
        "loads when it goes on; write the export under another name or elsewhere"
    )


def check_not_replacing(path: Path, force: bool, flag: str = "--out") -> None:
    """ValueError naming `flag` when `path` is there and --force was not given: a file the user has is never
    replaced unasked."""
    if path.exists() and not force:
        what = "a folder" if path.is_dir() else "a file"
        raise ValueError(f"{flag} {str(path)!r}: {what} already there; pass --force to replace it, or give another {flag}")


def _export_pipeline(trained: TrainedModel, model: torch.nn.Module, out: Path, force: bool) -> int:
    """A diffusers-backbone model as a DDPMPipeline folder, with the export config as feddiff_export.json."""
    from fedcore.model.diffusers_unet import DiffusersUNet
    from fedcore.payload.pretrained import PIPELINE_INDEX, PIPELINE_WEIGHTS, write_pipeline

    if not isinstance(model, DiffusersUNet):
        raise ValueError(
            f"--format diffusers: {trained.model!r} is feddiff's own UNet, for which diffusers has no class; "
            "export it with --format feddiff (safetensors weights and a JSON config) and sample it with feddiff sample"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; --format diffusers writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / PIPELINE_INDEX).is_file():
        raise ValueError(f"--out {str(out)!r} is a folder with other files in it; give a new or empty folder, or an earlier export")
    if (out / PIPELINE_INDEX).is_file():
        check_not_replacing(out, force)
    write_pipeline(model, out)
    config = export_config(trained, PIPELINE_WEIGHTS)
    (out / EXPORT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    print(f"exported {trained.describe()} as a diffusers DDPMPipeline: {out} (DDPMPipeline.from_pretrained({str(out)!r}))")
    return 0


# --- sample -------------------------------------------------------------------------------------------------


def _model_to_run(checkpoint: str, source: ModelSource, device_name: str, threads: int) -> tuple[TrainedModel, Denoiser, torch.device]:
    """The model `sample` and `evaluate` run, on its device, after setting torch's CPU threads (0: its default)."""
    import torch

    from fedcore.model.training import resolve_device

    if threads > 0:
        torch.set_num_threads(threads)
    trained = source.load(checkpoint)
    device = resolve_device(device_name)
    return trained, build_trained(trained).to(device), device


def sample(cfg: SampleConfig) -> int:
    """A PNG grid of the model's samples."""
    from fedcore.evaluation.images import save_grid
    from fedcore.model.diffusion import Schedule
    from fedcore.model.diffusion import sample as generate

    _check_grid_out(cfg.out, cfg.force)
    _check_sampler_steps(cfg)
    trained, model, device = _model_to_run(cfg.checkpoint, cfg.source, cfg.device, cfg.threads)
    with SamplingBar(f"sampling {cfg.samples:,} images", cfg.progress) as bar:
        images = generate(model, Schedule(), cfg.samples, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed, device=device, on_step=bar.step)
    out = save_grid(images, cfg.out, nrow=cfg.nrow or math.ceil(math.sqrt(cfg.samples)), scale=cfg.scale)
    steps = "1000 steps" if cfg.sampler == "ddpm" else f"{cfg.steps} steps"
    print(f"wrote {out}: {cfg.samples} samples of {trained.describe()} ({cfg.sampler}, {steps}, seed {cfg.seed}, {device})")
    return 0


def _check_grid_out(out: str, force: bool, flag: str = "--out") -> None:
    """ValueError naming `flag` (sample's --out, evaluate's --grid) for a path that is no PNG file to write:
    empty, a folder, not .png, a file of a run, or (without --force) a file already there."""
    path = Path(out)
    if not path.name:
        raise ValueError(f"{flag} {out!r}: expected a FILE.png path; an empty name")
    if path.is_dir():
        raise ValueError(f"{flag} {out!r} is a folder; expected a FILE.png path (e.g. {str(path / 'grid.png')!r})")
    check_not_run_file(path, flag)  # first: a run's file is the one thing never to touch, whatever its name
    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} {out!r} must end in .png")
    check_file_path(path, flag)
    check_not_replacing(path, force, flag)


def _check_sampler_steps(cfg: SampleConfig | EvaluateConfig) -> None:
    """ValueError when --steps is given with --sampler ddpm: ancestral sampling (fedcore.model.diffusion.sample_ddpm)
    takes every one of the schedule's steps, so that fewer steps would be silently ignored."""
    if cfg.sampler == "ddpm" and not settings.is_default(cfg, "steps"):
        raise ValueError(f"--steps {cfg.steps} with --sampler ddpm: DDPM sampling always takes all 1000 steps; drop --steps, or use --sampler ddim")


# --- evaluate -----------------------------------------------------------------------------------------------


def _reference(cfg: EvaluateConfig, extractor: FeatureExtractor, image_shape: tuple[int, ...]) -> ReferenceStats:
    """Statistics of the real images a model is compared with: Fashion-MNIST's test set, or a folder (kept in
    the user's cache of reference statistics, so the next evaluation against the same images reuses them)."""
    from fedcore.data.datasets import load_fashion_mnist, load_image_folder, to_model_range
    from fedcore.errors import DatasetError
    from fedcore.evaluation.fid import ReferenceStatsCache

    channels, size = image_shape[0], image_shape[1]
    if cfg.reference_dir:
        try:
            images = load_image_folder(cfg.reference_dir, size, channels).images
        except DatasetError as e:
            raise ValueError(f"--reference-dir {cfg.reference_dir!r}: {e}") from None
        name = f"folder:{cfg.reference_dir}"
    else:
        images = load_fashion_mnist(train=False, root=cfg.data_root).images
        name = "fashion-mnist/test"
        if tuple(images.shape[1:]) != image_shape:
            raise ValueError(f"the model makes {image_shape} images, Fashion-MNIST's are {tuple(images.shape[1:])}; pass --reference-dir")
    if cfg.reference_images > len(images):
        where = cfg.reference_dir or "Fashion-MNIST's test set"
        raise ValueError(f"--reference-images {cfg.reference_images:,}: {where} has {len(images):,} images; give at most {len(images):,} (0 = all)")
    if cfg.reference_images:
        images = images[: cfg.reference_images]
        name += f"[:{len(images)}]"
    if len(images) < 2:
        raise ValueError(f"the reference has {len(images)} image(s); the Frechet distance needs at least 2")
    return ReferenceStatsCache.default().get(extractor, name, to_model_range(images))


def evaluate(cfg: EvaluateConfig) -> int:
    """The Frechet distance of a model's samples to real images, on the committed classifier's features or
    on a user's pytorch-fid Inception weights (fedcore.evaluation), beside that of as many images of uniform noise."""
    import torch

    from fedcore.evaluation.extractors import load_extractor
    from fedcore.evaluation.fid import score_generator, uniform_noise_fd
    from fedcore.evaluation.images import save_grid

    if cfg.grid:
        _check_grid_out(cfg.grid, cfg.force, "--grid")
    _check_sampler_steps(cfg)
    trained, model, device = _model_to_run(cfg.checkpoint, cfg.source, cfg.device, cfg.threads)
    extractor = load_extractor(cfg.inception_weights, device)
    shape = (model.config.channels, model.config.image_size, model.config.image_size)
    reference = _reference(cfg, extractor, shape)
    with SamplingBar(f"sampling {cfg.samples:,} images", cfg.progress) as bar:
        score = score_generator(model, reference, extractor, cfg.sampling, device=device, on_step=bar.step)
    noise = uniform_noise_fd(reference, extractor, cfg.samples, shape, torch.Generator().manual_seed(cfg.seed))
    if cfg.grid:
        save_grid(score.samples[:GRID_IMAGES], cfg.grid, nrow=8)
    result = {**_evaluation(cfg, trained, score.fd, reference, extractor.name, device), "noise_fd": noise, "grid": cfg.grid or None}
    print(json.dumps(result) if cfg.json else _evaluation_line(result))
    return 0


def _evaluation(cfg: EvaluateConfig, trained: TrainedModel, fd: float, reference: ReferenceStats, features: str, device: torch.device) -> dict[str, Any]:
    """What `evaluate` found, as its --json object."""
    return {
        "fd": fd,
        "model": trained.describe(),
        "kind": trained.kind,
        "worker": trained.worker,
        "completed_rounds": trained.completed_rounds,
        "samples": cfg.samples,
        "sampler": cfg.sampler,
        "steps": 1000 if cfg.sampler == "ddpm" else cfg.steps,
        "seed": cfg.seed,
        "feature_extractor": features,
        "reference": {"dataset": reference.dataset, "count": reference.count},
        "device": str(device),
    }


def _evaluation_line(r: Mapping[str, Any]) -> str:
    """An evaluation (`_evaluation`) in one line for a person."""
    ref = r["reference"]
    worse = " (this model is no better than noise)" if r["fd"] >= r["noise_fd"] else ""
    few = f"; from fewer than {FEW_SAMPLES:,} samples an FD comes out higher: compare it only with FDs of as many samples" if r["samples"] < FEW_SAMPLES else ""
    grid = f"; grid of the first {min(r['samples'], GRID_IMAGES)} in {r['grid']}" if r["grid"] else ""
    return (
        f"FD {r['fd']:.2f} (lower is better): {r['samples']:,} {r['sampler']}-{r['steps']} samples of {r['model']} against "
        f"{ref['count']:,} images of {ref['dataset']} on {r['feature_extractor']} features (seed {r['seed']}, {r['device']}); "
        f"as many images of uniform noise score {r['noise_fd']:.2f}{worse}{few}{grid}"
    )


# --- settings and flags -------------------------------------------------------------------------------------

GridScale = Annotated[int, Interval(ge=1, le=16)]  # PNG pixels per image pixel, each way
FrechetSamples = Annotated[int, Interval(ge=2, le=settings.MAX_EVAL_SAMPLES)]  # the distance needs two images at least


@dataclass(frozen=True)
class ModelSource:
    """Which model of a checkpoint: the global one, or with `worker_state` a worker's personalised one."""

    __pydantic_config__ = settings.CONFIG

    worker_state: ExistingFolder = ""  # a worker's --state-dir (or simulate's OUT_DIR/clients): its personalised model
    private_stem: str = WORKER_PRIVATE_STEM  # name stem of the private-parts files in worker_state (a client's, in simulate's)
    model: ModelName | None = None  # model preset, where the checkpoint does not record it

    def load(self, checkpoint: str) -> TrainedModel:
        """The model of `checkpoint` (a checkpoint dir, a .safetensors file or a diffusers folder) this names."""
        trained = load_trained(checkpoint, self.model or "")
        return personalise(trained, self.worker_state, self.private_stem) if self.worker_state else trained


@dataclass(frozen=True)
class ExportConfig:
    """Every setting of `feddiff export`."""

    __pydantic_config__ = settings.CONFIG

    checkpoint: ExistingPath  # a checkpoint dir, a .safetensors file or a diffusers folder
    out: str  # FILE.safetensors, or a folder with format "diffusers"
    source: ModelSource = ModelSource()
    format: ExportFormat = "feddiff"
    force: bool = False  # replace an --out that is already there


@dataclass(frozen=True)
class SampleConfig:
    """Every setting of `feddiff sample`."""

    __pydantic_config__ = settings.CONFIG

    checkpoint: ExistingPath
    source: ModelSource = ModelSource()
    samples: EvalSamples = 64  # images in the grid
    out: str = "grid.png"
    sampler: SamplerKind = "ddim"
    steps: SamplingSteps = 100  # DDIM steps (DDPM takes all 1000)
    seed: Seed = 0
    device: Device = "auto"
    threads: Threads = 0  # CPU threads for torch (0 = torch's default)
    nrow: NonNegative = 0  # images per row (0 = a square grid)
    scale: GridScale = 2
    force: bool = False  # replace an --out that is already there
    progress: ProgressMode = "auto"  # of the sampling, on stderr


@dataclass(frozen=True)
class EvaluateConfig:
    """Every setting of `feddiff evaluate`."""

    __pydantic_config__ = settings.CONFIG

    checkpoint: ExistingPath
    source: ModelSource = ModelSource()
    samples: FrechetSamples = 1000  # images generated for the distance
    sampler: SamplerKind = "ddim"
    steps: SamplingSteps = 50  # DDIM steps (DDPM takes all 1000)
    seed: Seed = 0  # sampling noise
    reference_dir: ExistingFolder = ""  # real images to compare with; default: the Fashion-MNIST test set
    reference_images: NonNegative = 0  # the first N reference images (0 = all)
    data_root: ExistingFolder | None = None  # Fashion-MNIST folder (default: Debian's package)
    inception_weights: ExistingFile = ""  # pytorch-fid Inception-v3 weights; default: the bundled classifier
    grid: str = ""  # also write the first 64 samples as a PNG grid here
    force: bool = False  # replace a --grid that is already there
    device: Device = "auto"
    threads: Threads = 0
    json: bool = False
    progress: ProgressMode = "auto"  # of the sampling, on stderr

    @property
    def sampling(self) -> SamplingSpec:
        return SamplingSpec(num_samples=self.samples, sampler=self.sampler, steps=self.steps, seed=self.seed)


MEANING = {  # what each flag means; its type, range or choices and default come from the configs' fields
    "checkpoint": "a checkpoint dir (the coordinator's --checkpoint-dir or simulate's --out-dir: its final or newest global model), "
    "a .safetensors file or a diffusers folder",
    "worker_state": "a worker's --state-dir: its personalised model (the global shared parts + its private parts)",
    "private_stem": "name stem of the private-parts files: 'private' in a worker's --state-dir; client-N in `feddiff simulate`'s OUT_DIR/clients",
    "model": "model preset, where the checkpoint does not record it",
    "format": "feddiff: FILE.safetensors + FILE.json; diffusers: a DDPMPipeline folder (diffusers-backbone models)",
    "sampler": "ddim (--steps steps) or ddpm (all 1000)",
    "steps": "DDIM steps",
    "seed": "sampling noise",
    "device": "where to run (auto: CUDA when present)",
    "threads": "CPU threads for torch (0 = torch's default)",
    "nrow": "images per row (0 = a square grid)",
    "scale": "enlarge each pixel this many times in the PNG",
    "reference_dir": "a folder of real images to compare with (default: the Fashion-MNIST test set)",
    "reference_images": "use the first N reference images (0 = all)",
    "data_root": "Fashion-MNIST IDX folder (default: Debian's package)",
    "inception_weights": "pytorch-fid Inception-v3 weights: FD on its pool3 features (default: the bundled classifier)",
    "grid": "also write the first 64 samples as a grid",
    "json": "one JSON object for scripts",
    "progress": "of the sampling, on stderr: a bar on a terminal (auto), bar, a line every 10 s (log), or nothing",
    "force": "replace --out when it is already there (without it, an existing file is never overwritten)",
}
OWN_MEANING = {  # the flags whose words differ between the commands
    "export": {"out": "FILE.safetensors (the config goes to FILE.json), or a folder with --format diffusers"},
    "sample": {"out": "the PNG grid", "samples": "images generated for the grid"},
    "evaluate": {
        "samples": "images generated for the FD",
        "force": "replace --grid when it is already there (without it, an existing file is never overwritten)",
    },
}
# Old spellings, each still working with a notice: export's --checkpoint-dir (it takes a file too, as sample's and
# evaluate's --checkpoint do; the coordinator's --checkpoint-dir is a folder), sample's --n (--samples, as evaluate
# and reproduce say it), --client (a name, unlike --client-index).
OLD_SPELLINGS = {
    "export": {"checkpoint": ("--checkpoint-dir",)},
    "sample": {"samples": ("--n",)},
}
METAVARS = {
    "checkpoint": "DIR_OR_FILE",
    "worker_state": "DIR",
    "private_stem": "STEM",
    "reference_dir": "DIR",
    "inception_weights": "PATH",
    "grid": "PNG",
}


def _command(name: str, cls: type, run: Callable[[Any], int]) -> Command:
    """The command `name`: a flag per setting of `cls`, and `run` given the config the flags build."""

    def add(p: argparse.ArgumentParser) -> None:
        old = {"private_stem": ("--client",), **OLD_SPELLINGS.get(name, {})}
        metavars = {**METAVARS, "out": {"export": "FILE_OR_DIR", "sample": "PNG"}.get(name, "FILE")}
        flags.add_flags(p, cls, {**MEANING, **OWN_MEANING[name]}, metavars=metavars, old=old)

    return Command(add, lambda args: run(flags.build(cls, args)))


COMMANDS = {
    "export": _command("export", ExportConfig, export),
    "sample": _command("sample", SampleConfig, sample),
    "evaluate": _command("evaluate", EvaluateConfig, evaluate),
}
