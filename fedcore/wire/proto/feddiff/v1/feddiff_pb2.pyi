from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "device", "gpu_name", "gpu_memory_bytes", "num_examples", "software_version", "has_private_state", "digests", "installation_id", "instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_PRIVATE_STATE_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    INSTALLATION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: str
    gpu_name: str
    gpu_memory_bytes: int
    num_examples: int
    software_version: str
    has_private_state: bool
    digests: _containers.RepeatedScalarFieldContainer[str]
    installation_id: str
    instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[str] = ..., gpu_name: _Optional[str] = ..., gpu_memory_bytes: _Optional[int] = ..., num_examples: _Optional[int] = ..., software_version: _Optional[str] = ..., has_private_state: _Optional[bool] = ..., digests: _Optional[_Iterable[str]] = ..., installation_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_ms", "model", "strategy", "chunk_size", "rounds", "digests")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_ms: int
    model: str
    strategy: str
    chunk_size: int
    rounds: int
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., model: _Optional[str] = ..., strategy: _Optional[str] = ..., chunk_size: _Optional[int] = ..., rounds: _Optional[int] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("epochs", "batch_size", "lr", "loss", "seed")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    lr: float
    loss: str
    seed: int
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., loss: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class EvalSpec(_message.Message):
    __slots__ = ("sampler", "steps", "num_samples", "seed", "share_samples")
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHARE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    sampler: str
    steps: int
    num_samples: int
    seed: int
    share_samples: bool
    def __init__(self, sampler: _Optional[str] = ..., steps: _Optional[int] = ..., num_samples: _Optional[int] = ..., seed: _Optional[int] = ..., share_samples: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "task_id", "receives", "returns", "private_parts", "train", "eval", "payload_bytes", "payload_sha256", "payload_blake3")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    TRAIN: Task.Kind
    EVALUATE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVES_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_PARTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BLAKE3_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    task_id: str
    receives: _containers.RepeatedScalarFieldContainer[str]
    returns: _containers.RepeatedScalarFieldContainer[str]
    private_parts: _containers.RepeatedScalarFieldContainer[str]
    train: TrainSpec
    eval: EvalSpec
    payload_bytes: int
    payload_sha256: str
    payload_blake3: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., receives: _Optional[_Iterable[str]] = ..., returns: _Optional[_Iterable[str]] = ..., private_parts: _Optional[_Iterable[str]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., eval: _Optional[_Union[EvalSpec, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., payload_blake3: _Optional[str] = ...) -> None: ...

class WaitTaskRequest(_message.Message):
    __slots__ = ("session_id", "timeout_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    timeout_ms: int
    def __init__(self, session_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Done(_message.Message):
    __slots__ = ("rounds", "error")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    error: str
    def __init__(self, rounds: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class WaitTaskResponse(_message.Message):
    __slots__ = ("task", "idle", "done")
    TASK_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    idle: Idle
    done: Done
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., idle: _Optional[_Union[Idle, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("session_id", "task_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("round", "task_id", "parts", "total_bytes", "sha256", "format_version", "blake3")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    round: int
    task_id: str
    parts: _containers.RepeatedScalarFieldContainer[str]
    total_bytes: int
    sha256: str
    format_version: int
    blake3: str
    def __init__(self, round: _Optional[int] = ..., task_id: _Optional[str] = ..., parts: _Optional[_Iterable[str]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., format_version: _Optional[int] = ..., blake3: _Optional[str] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainReport(_message.Message):
    __slots__ = ("images_seen", "mean_loss", "seconds")
    IMAGES_SEEN_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    images_seen: int
    mean_loss: float
    seconds: float
    def __init__(self, images_seen: _Optional[int] = ..., mean_loss: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("session_id", "stream", "report")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    stream: StreamHeader
    report: TrainReport
    def __init__(self, session_id: _Optional[str] = ..., stream: _Optional[_Union[StreamHeader, _Mapping]] = ..., report: _Optional[_Union[TrainReport, _Mapping]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    def __init__(self, outcome: _Optional[str] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("session_id", "task_id", "round", "frechet_distance", "feature_extractor", "num_samples", "sample_grid_png")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FRECHET_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    round: int
    frechet_distance: float
    feature_extractor: str
    num_samples: int
    sample_grid_png: bytes
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., frechet_distance: _Optional[float] = ..., feature_extractor: _Optional[str] = ..., num_samples: _Optional[int] = ..., sample_grid_png: _Optional[bytes] = ...) -> None: ...

class EvaluationAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RejectTaskRequest(_message.Message):
    __slots__ = ("session_id", "task_id", "reason", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    reason: str
    message: str
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RejectTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "connected", "num_examples", "device", "gpu_name", "last_seen_seconds_ago")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    connected: bool
    num_examples: int
    device: str
    gpu_name: str
    last_seen_seconds_ago: float
    def __init__(self, worker_id: _Optional[str] = ..., connected: _Optional[bool] = ..., num_examples: _Optional[int] = ..., device: _Optional[str] = ..., gpu_name: _Optional[str] = ..., last_seen_seconds_ago: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("state", "completed_rounds", "rounds", "strategy", "model", "workers", "round_selected", "round_done", "payload_bytes_down", "payload_bytes_up", "parameters_exchanged", "full_fedavg_parameters", "reduction_vs_full", "frechet_distance", "error", "workers_omitted", "workers_connected")
    class FrechetDistanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SELECTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_DONE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_EXCHANGED_FIELD_NUMBER: _ClassVar[int]
    FULL_FEDAVG_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_VS_FULL_FIELD_NUMBER: _ClassVar[int]
    FRECHET_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    state: str
    completed_rounds: int
    rounds: int
    strategy: str
    model: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    round_selected: int
    round_done: int
    payload_bytes_down: int
    payload_bytes_up: int
    parameters_exchanged: int
    full_fedavg_parameters: int
    reduction_vs_full: float
    frechet_distance: _containers.ScalarMap[str, float]
    error: str
    workers_omitted: int
    workers_connected: int
    def __init__(self, state: _Optional[str] = ..., completed_rounds: _Optional[int] = ..., rounds: _Optional[int] = ..., strategy: _Optional[str] = ..., model: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., round_selected: _Optional[int] = ..., round_done: _Optional[int] = ..., payload_bytes_down: _Optional[int] = ..., payload_bytes_up: _Optional[int] = ..., parameters_exchanged: _Optional[int] = ..., full_fedavg_parameters: _Optional[int] = ..., reduction_vs_full: _Optional[float] = ..., frechet_distance: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., workers_omitted: _Optional[int] = ..., workers_connected: _Optional[int] = ...) -> None: ...
