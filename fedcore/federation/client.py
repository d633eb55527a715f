"""One federated client: its shard, its private parts, and one round's work (load, train, delta)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedcore.errors import FeddiffError
from fedcore.federation.aggregate import delta
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import Part, PartLayout
from fedcore.model.training import LocalTrainer, StepCallback, TrainConfig, TrainResult
from fedcore.model.unet import layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta


@dataclass(frozen=True)
class TrainTask:
    """What the server asks of one client in one round."""

    round_index: int  # 0-based
    task_id: str  # unique per (round, client)
    receives: frozenset[Part]  # parts in the weights payload
    returns: frozenset[Part]  # parts whose delta goes back
    private: frozenset[Part]  # parts the client keeps for good (its own, from earlier rounds)
    train: TrainConfig
    seed: int  # seeds the shuffling, timesteps and noise of this round's training

    @property
    def payload_round(self) -> int:
        """The round its payloads and stream headers name (the wire's `round`): the round index."""
        return self.round_index


@dataclass(frozen=True)
class EvalTask:
    """Sample from this client's own model (shared parts as received, private parts its own) and score it."""

    completed_rounds: int  # rounds completed when the evaluation was asked for
    task_id: str
    receives: frozenset[Part]  # the shared parts, as the global model has them now
    private: frozenset[Part]  # the client's own parts
    spec: SamplingSpec
    share_samples: bool = False  # send a sample grid back (off: no image leaves the client)
    returns: frozenset[Part] = frozenset()  # nothing goes back but the score

    @property
    def payload_round(self) -> int:
        """The round its payloads and stream headers name (the wire's `round`): the rounds completed."""
        return self.completed_rounds


class MissingPrivateState(FeddiffError):
    """The client was asked to train with private parts it does not hold (it needs the full model again)."""

    reason = "missing_private_state"


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
        private: Mapping[str, torch.Tensor] | None = None,
    ):
        self.client_id = client_id
        self.model_name = model_name
        self.trainer = trainer
        self.data = data  # (N, C, H, W) in model range, on the training device
        self.layout: PartLayout = layout_of(trainer.model)
        self._params = trainer.model.state_dict()  # views of the live parameters
        self.private: dict[str, torch.Tensor] = {k: v.detach().cpu().clone() for k, v in (private or {}).items()}
        self._base: dict[str, torch.Tensor] = {}

    @property
    def num_examples(self) -> int:
        return int(self.data.shape[0])

    @property
    def has_private_state(self) -> bool:
        return bool(self.private)

    @torch.no_grad()
    def load(self, payload: bytes | bytearray | memoryview, task: TrainTask | EvalTask) -> None:
        """Put the received parts and this client's private parts into the model."""
        received = serialization.decode(payload, self.layout, kind="weights", parts=task.receives, round_index=task.payload_round, model=self.model_name)
        for name, t in received.items():
            self._params[name].copy_(t)
        for name in self.layout.names(task.private - task.receives):
            if name not in self.private:
                raise MissingPrivateState(f"client {self.client_id!r} holds no private tensor {name!r}; it needs the full model again")
            self._params[name].copy_(self.private[name])
        self._base = {name: self._params[name].detach().clone() for name in self.layout.names(task.returns)}

    def train(
        self,
        task: TrainTask,
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        result = self.trainer.train(self.data, task.train, seed=task.seed, on_step=on_step, should_stop=should_stop)
        self.private = {name: self._params[name].detach().cpu().clone() for name in self.layout.names(task.private)}
        return result

    def update(self, task: TrainTask) -> bytes:
        """Safetensors bytes of local - received for the parts this client returns."""
        local = {name: self._params[name] for name in self._base}
        meta = PayloadMeta(kind="delta", model=self.model_name, round_index=task.round_index, parts=task.returns)
        return serialization.encode(delta(local, self._base), meta)

    def sampling_model(self) -> Denoiser:
        """The model as loaded (for evaluation after `load` of an EvalTask)."""
        return self.trainer.model

    def model_state(self) -> dict[str, torch.Tensor]:
        """This client's current full model (its personalised one under udec/ulatdec), on the CPU."""
        return {name: t.detach().cpu().clone() for name, t in self._params.items()}
