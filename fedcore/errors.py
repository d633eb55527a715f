"""Typed domain errors; each carries the `reason` that labels it in metrics. gRPC codes are mapped elsewhere.
Also `shortened`: an error's or a worker's message cut to the bound of where it goes."""

from __future__ import annotations


class FeddiffError(Exception):
    """Base of every error feddiff raises on purpose."""

    reason = "error"


class PayloadError(FeddiffError):
    """A weights payload that cannot be used (the sender's fault)."""

    reason = "bad_payload"


class NotSafetensors(PayloadError):
    reason = "not_safetensors"


class SchemaError(PayloadError):
    """Unknown, missing, mis-shaped or mis-typed tensors."""

    reason = "bad_schema"


class NonFiniteTensor(PayloadError):
    reason = "non_finite"


class ValueOutOfBounds(PayloadError):
    """A finite value larger than the task's training can produce (fedcore.federation.robust.delta_value_bound): folded
    in, it would swamp or overflow the average."""

    reason = "out_of_bounds"


class CodecSpecError(PayloadError):
    """A coded tensor's spec (fedcore.payload.codecs) that is malformed, names a codec this version does not know,
    or another codec than the receiver expects."""

    reason = "bad_codec"


class BadScale(PayloadError):
    """A block's scale (its absmax, fedcore.payload.codecs) that is negative or disagrees with its codes: zero for
    a block holding a nonzero code, positive for a block whose largest |code| is not the codec's largest."""

    reason = "bad_scale"


class CodeOutOfRange(PayloadError):
    """A quantized code outside its codec's symmetric range (-127..127 for int8, -7..7 for int4), or the padding
    nibble of an odd-length int4 tensor that is not zero (fedcore.payload.codecs)."""

    reason = "bad_code"


class BadIndices(PayloadError):
    """Sparse (top-k) indices that are not strictly increasing within [0, n): out of range, repeated or unsorted
    (fedcore.payload.codecs)."""

    reason = "bad_indices"


class StreamError(FeddiffError):
    """A chunked stream that does not match its header."""

    reason = "bad_stream"


class HeaderError(StreamError):
    reason = "bad_header"


class SizeMismatch(StreamError):
    reason = "bad_size"


class HashMismatch(StreamError):
    reason = "bad_hash"


class StreamTooLong(StreamError):
    reason = "too_large"


class UploadInProgress(StreamError):
    """A second upload from a session that has one open: one upload at a time per worker, so that no worker
    holds two upload slots, nor the receive memory of streams waiting for one."""

    reason = "upload_in_progress"


class UploadAborted(StreamError):
    """An upload cut off before its last byte (its connection ended, or its worker's session was replaced):
    nothing it sent is refused, it simply did not arrive. Its outcome is `aborted`, not a refusal."""

    reason = "aborted"


class UploadStalled(UploadAborted):
    """An upload that received nothing for the coordinator's `upload_idle_timeout`: cut off, so that its
    upload slot goes to a worker that sends."""


class RoundError(FeddiffError):
    """An update that does not fit the round in progress."""

    reason = "bad_round"


class WrongRound(RoundError):
    reason = "wrong_round"


class DuplicateUpdate(RoundError):
    reason = "duplicate"


class NotAssigned(RoundError):
    """Parts, or a task, that were not given to this worker."""

    reason = "not_assigned"


class LateUpdate(RoundError):
    reason = "late"


class DownloadEnded(FeddiffError):
    """A weights download the coordinator ended before its last byte."""

    reason = "download_ended"


class TaskClosed(DownloadEnded, LateUpdate):
    """A weights download whose task's round (or evaluation phase) closed before the stream was read to its end."""

    reason = LateUpdate.reason


class DownloadSuperseded(DownloadEnded):
    """A weights download of an earlier session, ended because its worker joined again and downloads anew."""

    reason = "superseded"


class DownloadInProgress(FeddiffError):
    """A second download from a session whose earlier one has not ended on the wire: one at a time per worker."""

    reason = "download_in_progress"


class DownloadStalled(DownloadEnded):
    """A weights download its worker read nothing of for the coordinator's `download_idle_timeout`: cut off."""

    reason = "stalled"


class BadEvaluation(FeddiffError):
    """An evaluation report its task cannot have produced: a Frechet distance that is not a finite number >= 0,
    or another number of samples than the task asked for."""

    reason = "bad_evaluation"


class NonFiniteAggregate(FeddiffError):
    """A round's averaged update would make the global model NaN or infinite: the round is not committed."""

    reason = "non_finite"


class FieldOutOfRange(FeddiffError):
    """A field of a request outside the bound the wire contract documents for it (proto/feddiff/v1)."""

    reason = "bad_field"


class UnknownWorker(FeddiffError):
    reason = "unauthenticated"


class BadWorkerInfo(FeddiffError):
    """A WorkerInfo with an out-of-range field (worker id, FedAvg weight)."""

    reason = "bad_worker_info"


class UnregisteredWorker(FeddiffError):
    """A worker id missing from the coordinator's registered image counts (worker_sizes): it has no FedAvg weight to get."""

    reason = "unregistered"


class DuplicateWorker(FeddiffError):
    """Another installation of this worker id holds a live session: two processes would take turns as one
    identity, their shards averaged under one weight and their private parts split over two state dirs."""

    reason = "duplicate_worker"


class TaskRefused(FeddiffError):
    """A task a worker cannot run. The worker tells the coordinator (RejectTask) with the reason, which the
    coordinator counts as outcome `rejected_<reason>` of feddiff_updates_total."""

    reason = "other"


class MalformedTask(TaskRefused):
    """Unknown parts, a task returning what it did not receive, an unknown kind."""

    reason = "bad_task"


class SettingOutOfRange(TaskRefused):
    """A training or sampling setting outside the range a worker runs (`fedcore.settings`)."""

    reason = "out_of_range"


class DataMismatch(TaskRefused):
    """The worker's images do not fit the federation's model (size or channels)."""

    reason = "data_mismatch"


class OutOfMemory(TaskRefused):
    """The task does not fit the worker's device memory (a batch too large for its GPU)."""

    reason = "out_of_memory"


class ModelUnavailable(TaskRefused):
    """A model preset this installation cannot build: its backbone needs an optional dependency that is not
    installed (the `diffusers` extra). A process asked for it at start exits naming the extra; a worker
    joined to a run of it refuses each task."""

    reason = "model_unavailable"


class MissingSharedState(TaskRefused):
    """A coded change of the shared model (a run with coded downloads) from another version than the worker holds:
    the coordinator counted a download the worker never applied. The coordinator sends it the values next."""

    reason = "missing_shared_state"


REJECTION_REASONS = frozenset(
    cls.reason for cls in (TaskRefused, MalformedTask, SettingOutOfRange, DataMismatch, OutOfMemory, ModelUnavailable, MissingSharedState)
)


def rejected_outcome(reason: str) -> str:
    """The outcome label of feddiff_updates_total for a task refused with `reason`, on both sides; a reason
    not known here is "other" (a label's values must stay few)."""
    return f"rejected_{reason if reason in REJECTION_REASONS else TaskRefused.reason}"


class CannotListen(FeddiffError):
    """A port the process was told to listen on is taken or cannot be bound: the process does not start."""

    reason = "cannot_listen"


class ExistingRun(FeddiffError):
    """A new run asked to start in a folder that holds another one (`fedcore.federation.checkpoint.run_in`):
    its checkpoints, round log and final model would be overwritten or pruned. Nothing in the folder is changed."""

    reason = "existing_run"

    def __init__(self, directory: object, found: str, flag: str):
        super().__init__(
            f"{flag} {directory} holds a run ({found}): pass --resume to continue it, or give another {flag} for a new run; nothing in it was changed"
        )


class DifferentRun(FeddiffError):
    """A resume asked for settings that define a run (`FederationConfig.DEFINING`) other than those its
    checkpoint was made with: the resumed run would not be the one it continues. Nothing in the folder is changed."""

    reason = "different_run"

    def __init__(self, directory: object, differences: list[tuple[str, object, object]]):
        keys = ", ".join(f"{key} (saved {saved!r}, given {given!r})" for key, saved, given in differences)
        super().__init__(
            f"--resume: the run in {directory} was made with other settings that define it: {keys}; resume with the saved "
            "values, or start a new run in another folder; nothing in it was changed"
        )


class MissingPrivateState(FeddiffError):
    """Raised when a client is asked to train with private parts it does not hold (it needs the full model again)."""

    reason = "missing_private_state"


class TrainingProcessFailed(FeddiffError):
    """Raised when a training process of a simulation's device pool raises or dies: the run stops with its error."""

    reason = "training_process_failed"


# --- a process's inputs, refused before (or instead of) any work: the command line says why in one line ---------
class SettingsError(FeddiffError, ValueError):
    """Raised when values are not of their setting's type or lie outside its range; the message is one line that
    names each setting, its value and what was expected."""

    reason = "bad_settings"


class DatasetError(FeddiffError, ValueError):
    """Raised when a dataset is missing on disk or its files are malformed."""

    reason = "bad_dataset"


class AssetIntegrityError(FeddiffError):
    """Raised when a committed weights file does not match the sha256 recorded beside it."""

    reason = "bad_asset"


ELLIPSIS = "..."  # the mark at the end of a message cut to its bound


def shortened(message: str, most: int) -> str:
    """`message` when it has at most `most` characters, else its start cut to `most` with ELLIPSIS at the end: an
    explanation or a status kept within its bound (a log line, a status's trailers, a message field)."""
    return message if len(message) <= most else message[: most - len(ELLIPSIS)] + ELLIPSIS
