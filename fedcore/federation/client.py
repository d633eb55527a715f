"""One federated client: its shard, its private parts, and one round's work (load, train, delta)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedcore.errors import MissingPrivateState, MissingSharedState, SchemaError
from fedcore.federation.aggregate import delta
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import PART_ORDER, Part, PartLayout
from fedcore.model.training import LocalTrainer, StepCallback, TrainConfig, TrainResult
from fedcore.model.unet import layout_of
from fedcore.payload import coded, initial, serialization
from fedcore.payload.codecs import Codec, Identity
from fedcore.payload.feedback import ErrorFeedback
from fedcore.payload.serialization import PayloadMeta


@dataclass(frozen=True)
class TrainTask:
    """What the server asks of one client in one round."""

    round_index: int  # 0-based
    task_id: str  # unique per (round, client)
    receives: frozenset[Part]  # parts in the weights payload
    returns: frozenset[Part]  # parts whose delta goes back
    private_parts: frozenset[Part]  # parts the client keeps for good (its own, from earlier rounds)
    train: TrainConfig
    seed: int  # seeds the shuffling, timesteps and noise of this round's training
    codec: Codec = Identity()  # how the delta goes back (fedcore.payload.codecs), with error feedback

    @property
    def wire_round(self) -> int:
        """What the wire's `round` fields carry for this task (`Task.round`, its stream headers, its payloads'
        `round` metadata): for a train task, its round index."""
        return self.round_index


@dataclass(frozen=True)
class EvalTask:
    """Sample from this client's own model (shared parts as received, private parts its own) and score it."""

    completed_rounds: int  # rounds completed when the evaluation was asked for
    task_id: str
    receives: frozenset[Part]  # the shared parts, as the global model has them now
    private_parts: frozenset[Part]  # the client's own parts
    spec: SamplingSpec
    share_samples: bool = False  # send a sample grid back (off: no image leaves the client)
    returns: frozenset[Part] = frozenset()  # nothing goes back but the score

    @property
    def wire_round(self) -> int:
        """What the wire's `round` fields carry for this task (`Task.round`, its stream headers, its payload's
        `round` metadata): for an evaluate task, the rounds completed."""
        return self.completed_rounds


class ClientRuntime:
    """Applies tasks to a trainer's model. Several runtimes may share one trainer (simulation on one GPU):
    each task loads everything the model needs, received parts from the payload and private parts from
    this client's own copy, so no state leaks between clients."""

    def __init__(
        self,
        client_id: str,
        model_name: str,
        trainer: LocalTrainer,
        data: torch.Tensor,
        private_tensors: Mapping[str, torch.Tensor] | None = None,
        residuals: Mapping[str, torch.Tensor] | None = None,
    ):
        self.client_id = client_id
        self.model_name = model_name
        self.trainer = trainer
        self.data = data  # (N, C, H, W) in model range, on the training device
        self.layout: PartLayout = layout_of(trainer.model)
        self._params = trainer.model.state_dict()  # views of the live parameters
        self.private_tensors: dict[str, torch.Tensor] = {k: v.detach().cpu().clone() for k, v in (private_tensors or {}).items()}
        self._base: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}  # the shared model of a run with coded downloads, as received
        self.shared_version = -1  # its version (-1: none)
        # What a lossy codec left out of the deltas so far, per tensor (error feedback); residuals of tensors
        # this model does not have (another run's state) are dropped
        specs = self.layout.specs(PART_ORDER)
        self.residuals: dict[str, torch.Tensor] = {
            name: t.detach().cpu().float() for name, t in (residuals or {}).items() if name in specs and tuple(t.shape) == specs[name].shape
        }

    @property
    def num_examples(self) -> int:
        return int(self.data.shape[0])

    @property
    def has_private_state(self) -> bool:
        return bool(self.private_tensors)

    @torch.no_grad()
    def load(self, payload: bytes | bytearray | memoryview, task: TrainTask | EvalTask) -> None:
        """Put the received parts and this client's private parts into the model. In a run with coded downloads
        the received parts are the shared model's: its values, or its coded change since the version this
        client holds, added to it as the coordinator adds it (`shared`, bit for bit)."""
        meta = serialization.read_meta(payload)
        if meta.base >= 0:
            received = self._apply_change(payload, task, meta)
        else:
            received = serialization.decode(payload, self.layout, kind="weights", parts=task.receives, wire_round=task.wire_round, model=self.model_name)
            if meta.version >= 0:
                self.shared, self.shared_version = {n: t.clone() for n, t in received.items()}, meta.version
        for name, t in received.items():
            self._params[name].copy_(t)
        for name in self.layout.names(task.private_parts - task.receives):
            if name not in self.private_tensors:
                raise MissingPrivateState(f"client {self.client_id!r} holds no private tensor {name!r}; it needs the full model again")
            self._params[name].copy_(self.private_tensors[name])
        self._base = {name: self._params[name].detach().clone() for name in self.layout.names(task.returns)}

    def _apply_change(self, payload: bytes | bytearray | memoryview, task: TrainTask | EvalTask, meta: PayloadMeta) -> dict[str, torch.Tensor]:
        """The shared model after a coded change from the version this client holds (none when the payload says
        it is unchanged: version = base, no tensors). A change from version 0 that carries the run's seed is
        applied to the model this client builds from it when it holds no version 0 (`_build_from_seed`).
        MissingSharedState when it holds another version or not every part the change is for, or its build
        from the seed differs from the coordinator's; payload errors (fedcore.errors) for a payload that is not
        the change it says, with nothing loaded."""
        names = self.layout.names(task.receives)
        holds = meta.base == self.shared_version and all(n in self.shared for n in names)
        codec = task.codec if isinstance(task, TrainTask) else Codec.parse(meta.codec)
        reader = serialization.PayloadReader(self.layout, kind="weights", wire_round=task.wire_round, model=self.model_name)
        if not holds and meta.seed < 0:
            raise MissingSharedState(
                f"client {self.client_id!r} holds version {self.shared_version} of the shared model, the change is from version {meta.base}; it needs the values again"
            )
        if meta.version == meta.base:
            _check_unchanged(reader, codec, payload, task.receives, meta)
            change = None
        else:
            change, _ = coded.decode(reader, codec, payload, task.receives)
        shared = self.shared if holds else self._build_from_seed(meta)
        self.shared = {n: shared[n] if change is None else shared[n].add_(change[n]) for n in names}
        self.shared_version = meta.version
        return self.shared

    def _build_from_seed(self, meta: PayloadMeta) -> dict[str, torch.Tensor]:
        """Version 0 of the shared model, the run's initial model, built from the payload's seed; MissingSharedState
        naming both digests when this build's differs from the coordinator's (another torch version or platform
        initialises differently): the coordinator then sends the values."""
        state = initial.initial_state(self.model_name, meta.seed)
        digest = initial.state_digest(state, self.layout)
        if digest != meta.digest:
            raise MissingSharedState(
                f"client {self.client_id!r} built the initial model of {self.model_name!r} with seed {meta.seed} as digest {digest}, "
                f"the coordinator's is {meta.digest}; it needs the values"
            )
        return state

    def train(
        self,
        task: TrainTask,
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        result = self.trainer.train(self.data, task.train, seed=task.seed, on_step=on_step, should_stop=should_stop)
        self.private_tensors = {name: self._params[name].detach().cpu().clone() for name in self.layout.names(task.private_parts)}
        return result

    def delta_payload(self, task: TrainTask) -> bytes:
        """The delta's payload: safetensors bytes of local - received for the parts this client returns, coded by
        the task's codec: plus what the codec left out of this client's earlier deltas, and keeping what it leaves out of this
        one (`residuals`, error feedback; none for `none`)."""
        local = {name: self._params[name] for name in self._base}
        meta = PayloadMeta(kind="delta", model=self.model_name, wire_round=task.round_index, parts=task.returns, codec=task.codec.name)
        deltas = delta(local, self._base)
        if isinstance(task.codec, Identity):
            return serialization.encode(deltas, meta)
        feedback = ErrorFeedback(task.codec, self.residuals)
        encoded = feedback.compress_all(deltas)
        self.residuals = feedback.state_dict()
        return coded.encode(deltas, meta, encoded)

    def sampling_model(self) -> Denoiser:
        """The model as loaded (for evaluation after `load` of an EvalTask)."""
        return self.trainer.model


def _check_unchanged(
    reader: serialization.PayloadReader, codec: Codec, payload: bytes | bytearray | memoryview, parts: frozenset[Part], meta: PayloadMeta
) -> None:
    """Refuse an "unchanged" payload (version = base) that is not one: metadata other than the reader's and the
    task's (`PayloadReader.check_meta`), or any tensor (SchemaError naming the first)."""
    reader.check_meta(meta, parts, codec.name)
    _, entries, _ = serialization.read_header(payload)
    if entries:
        raise SchemaError(f"unchanged payload of version {meta.version} holds tensor {next(iter(entries))!r} ({len(entries)} in all); it holds none")
