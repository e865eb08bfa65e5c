"""Every message the services exchange, in one place.

Each message is a frozen pydantic model with a literal ``kind`` and a version ``v``; all of
them decode through one discriminated union (``Message``). On the wire a message is msgpack
with content type ``application/msgpack``; tensors travel as raw little-endian bytes.

To submit a job from any AMQP client, publish an ``InferJob`` to the ``cicada.jobs``
exchange with routing key ``job`` and read the ``JobResult`` from your ``reply_to`` queue
(matched by ``correlation_id``). See the README for an example.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from cicada_shared.errors import CicadaError, MessageTooLarge

CONTENT_TYPE = "application/msgpack"
VERSION = 1

#: Open Inference Protocol datatypes we carry, with their size in bytes.
DATATYPES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"
]

#: Job priorities: 0 (background) … 9 (most urgent); the AMQP priority of the job message.
PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 0

JobState = Literal["queued", "fetching", "loading", "running", "succeeded", "failed", "cancelled"]
ModelState = Literal["preparing", "ready", "loading", "resident", "failed"]


class Contract(BaseModel):
    """Base of every message: immutable, strict about unknown fields, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = Field(VERSION, description="Contract version; bumped on breaking changes.")


class Tensor(BaseModel):
    """A named tensor: raw little-endian bytes in C order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Input or output name, e.g. 'input_ids' or 'logits'.")
    datatype: Datatype = Field(description="Open Inference Protocol datatype.")
    shape: list[int] = Field(description="Dimensions, outermost first.")
    data: bytes = Field(description="prod(shape) × itemsize bytes, little-endian, C order.")


class ErrorInfo(BaseModel):
    """Why something failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(description="Error class, e.g. 'MissingTensors', 'UnknownModel'.")
    message: str = Field(description="Human-readable reason, naming file and tensor if any.")

    @classmethod
    def of(cls, error: BaseException) -> ErrorInfo:
        kind = error.kind if isinstance(error, CicadaError) else type(error).__name__
        return cls(kind=kind, message=str(error) or kind)


def check_payload(tensors: Iterable[Tensor], limit: int, what: str, advice: str = "") -> None:
    """Refuse ``tensors`` whose bytes one message cannot carry (``MessageTooLarge``)."""
    size = sum(len(t.data) for t in tensors)
    if size > limit:
        raise MessageTooLarge(
            f"the {what} take {size} bytes, more than one message may carry ({limit}){advice}"
        )


class TensorSpec(BaseModel):
    """An input or output as model metadata describes it (-1: any size)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Input or output name.")
    datatype: Datatype = Field(description="Open Inference Protocol datatype.")
    shape: list[int] = Field(description="Dimensions; -1 where any size is accepted.")


# -- jobs ------------------------------------------------------------------------------------


class InferJob(Contract):
    """A request to run a model. Published by the gateway or by any AMQP client."""

    kind: Literal["infer_job"] = "infer_job"
    job_id: str = Field(description="Unique id, chosen by the submitter (also correlation_id).")
    model: str = Field(description="Registered model name.")
    inputs: list[Tensor] = Field(description="Forward arguments by name.")
    outputs: list[str] | None = Field(None, description="Outputs to return; None: all.")
    priority: int = Field(
        PRIORITY_DEFAULT,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="0 (background) … 9 (most urgent).",
    )
    submitted_at: float = Field(description="Wall-clock time the job entered the system.")
    deadline_s: float | None = Field(None, description="Fail the job if not done by then.")


class RunJob(Contract):
    """Scheduler → loader: run this job; on a cold start the weights are already coming."""

    kind: Literal["run_job"] = "run_job"
    job: InferJob = Field(description="The job as it was submitted.")
    uri: str = Field(description="Where the model's checkpoint lives.")
    fetch_id: str | None = Field(None, description="The fetch feeding this cold start.")
    reply_to: str | None = Field(None, description="Queue for the JobResult, if any.")


class JobResult(Contract):
    """The outcome of a job: to its ``reply_to`` and to the scheduler."""

    kind: Literal["job_result"] = "job_result"
    job_id: str = Field(description="The job's unique id.")
    model: str = Field(description="Registered model name.")
    state: Literal["succeeded", "failed", "cancelled"] = Field(description="How the job ended.")
    outputs: list[Tensor] = Field(default_factory=list)
    error: ErrorInfo | None = None
    cold: bool = Field(False, description="True when the model was loaded for this job.")
    timeline: dict[str, Any] = Field(
        default_factory=dict, description="e2e_s, ttfl_s, utilization … of the cold start"
    )
    loader_id: str | None = None
    queue_s: float | None = Field(None, description="Time from submission to dispatch.")
    compute_s: float | None = Field(None, description="Time in the forward pass.")


class JobProgress(Contract):
    """Loader → scheduler: a running job changed state."""

    kind: Literal["job_progress"] = "job_progress"
    job_id: str = Field(description="The job's unique id.")
    state: JobState = Field(description="The job's new state.")
    loader_id: str = Field(description="The loader that runs (or ran) the job.")


class CancelJob(Contract):
    """Scheduler → loader: stop this job if it is still running (between two layers)."""

    kind: Literal["cancel_job"] = "cancel_job"
    job_id: str = Field(description="The job to stop.")


class UnloadModel(Contract):
    """Scheduler → loaders and weights services: the model was unregistered. A loader frees
    it; a weights service deletes its cached copy."""

    kind: Literal["unload_model"] = "unload_model"
    model: str = Field(description="Registered model name.")


# -- weights ---------------------------------------------------------------------------------


class FetchRequest(Contract):
    """Scheduler → weights: fetch a checkpoint into this node's cache, in this order."""

    kind: Literal["fetch_request"] = "fetch_request"
    fetch_id: str = Field(description="Unique id of one fetch.")
    model: str = Field(description="Registered model name.")
    uri: str = Field(description="Where the model's checkpoint lives (file:// or http(s)://).")
    order: list[list[str]] = Field(
        default_factory=list, description="Checkpoint keys grouped by unit, execution order."
    )
    priority: int = Field(PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    announce_to: str = Field(description="Routing key on the events exchange for announcements.")


class FetchCancel(Contract):
    kind: Literal["fetch_cancel"] = "fetch_cancel"
    fetch_id: str = Field(description="Unique id of one fetch.")


class ManifestAnnounced(Contract):
    """Weights → loader: the cache files exist (at full size, header written)."""

    kind: Literal["manifest_announced"] = "manifest_announced"
    fetch_id: str = Field(description="Unique id of one fetch.")
    cache_dir: str = Field(description="Node-local directory holding the checkpoint's files.")
    at: float = Field(description="Wall-clock time.")


class PieceAnnounced(Contract):
    """Weights → loader: these tensors' bytes are in the cache file."""

    kind: Literal["piece_announced"] = "piece_announced"
    fetch_id: str = Field(description="Unique id of one fetch.")
    index: int = Field(description="The piece's place in the fetch plan.")
    file: str = Field(description="The shard file the piece belongs to.")
    tensors: list[str] = Field(description="Checkpoint keys whose bytes are now in the cache.")
    ranges: list[tuple[int, int]] = Field(description="Absolute byte ranges written.")
    started: float = Field(description="Wall-clock time the first range was requested.")
    landed: float = Field(description="Wall-clock time the last range landed.")


class FetchFinished(Contract):
    kind: Literal["fetch_finished"] = "fetch_finished"
    fetch_id: str = Field(description="Unique id of one fetch.")
    nbytes: int = Field(description="Bytes copied from the origin (0 when served from the cache).")
    at: float = Field(description="Wall-clock time.")


class FetchFailedNotice(Contract):
    kind: Literal["fetch_failed"] = "fetch_failed"
    fetch_id: str = Field(description="Unique id of one fetch.")
    error: ErrorInfo = Field(description="What went wrong.")
    at: float = Field(description="Wall-clock time.")


# -- loaders and models ----------------------------------------------------------------------


class LoaderStatus(Contract):
    """Loader → scheduler, every heartbeat: what it holds and how busy it is."""

    kind: Literal["loader_status"] = "loader_status"
    loader_id: str = Field(description="The loader's unique name.")
    node: str = Field(description="The machine it runs on (its weights service and cache).")
    resident: list[str] = Field(description="Models loaded and ready.")
    slots: int = Field(description="Jobs it can run at once.")
    busy: int = Field(description="Jobs it is running.")
    at: float = Field(description="Wall-clock time of this report.")
    stopping: bool = Field(False, description="True on the last report before it stops.")
    memory_bytes: int = Field(0, description="Bytes of resident models.")
    memory_budget_bytes: int = Field(0, description="Its budget for resident models.")
    running: list[str] | None = Field(
        None, description="Ids of the jobs it is running now (None: it does not say)."
    )


class PrepareModel(Contract):
    """Scheduler → a loader: learn a model's execution order and metadata (no weights)."""

    kind: Literal["prepare_model"] = "prepare_model"
    model: str = Field(description="Registered model name.")
    uri: str = Field(description="Where the model's checkpoint lives (file:// or http(s)://).")


class ModelPrepared(Contract):
    kind: Literal["model_prepared"] = "model_prepared"
    model: str = Field(description="Registered model name.")
    uri: str | None = Field(None, description="The checkpoint prepared (the name may move).")
    order: list[list[str]] = Field(default_factory=list)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    error: ErrorInfo | None = None


# -- requests to the scheduler (RPC) ---------------------------------------------------------


class RegisterModel(Contract):
    kind: Literal["register_model"] = "register_model"
    model: str = Field(description="Registered model name.")
    uri: str = Field(description="Where the model's checkpoint lives (file:// or http(s)://).")


class UnregisterModel(Contract):
    kind: Literal["unregister_model"] = "unregister_model"
    model: str = Field(description="Registered model name.")


class GetModel(Contract):
    kind: Literal["get_model"] = "get_model"
    model: str = Field(description="Registered model name.")


class ListModels(Contract):
    kind: Literal["list_models"] = "list_models"


class GetJob(Contract):
    kind: Literal["get_job"] = "get_job"
    job_id: str = Field(description="The job's unique id.")


class CancelRequest(Contract):
    kind: Literal["cancel_request"] = "cancel_request"
    job_id: str = Field(description="The job's unique id.")


class Health(Contract):
    kind: Literal["health"] = "health"


class Reply(Contract):
    """Scheduler → requester: the answer to an RPC request."""

    kind: Literal["reply"] = "reply"
    ok: bool = Field(description="True when the request succeeded.")
    error: ErrorInfo | None = None
    data: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[
    InferJob
    | RunJob
    | JobResult
    | JobProgress
    | CancelJob
    | FetchRequest
    | FetchCancel
    | ManifestAnnounced
    | PieceAnnounced
    | FetchFinished
    | FetchFailedNotice
    | LoaderStatus
    | PrepareModel
    | ModelPrepared
    | UnloadModel
    | RegisterModel
    | UnregisterModel
    | GetModel
    | ListModels
    | GetJob
    | CancelRequest
    | Health
    | Reply,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode(message: Contract) -> bytes:
    """The wire form of ``message``."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def decode(body: bytes) -> Message:
    """Parse a wire message; raises ``ValueError`` (a ``pydantic.ValidationError`` or a msgpack
    error) when it is not one of ours."""
    try:
        doc = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise ValueError(f"not msgpack: {exc}") from exc
    return _ADAPTER.validate_python(doc)
