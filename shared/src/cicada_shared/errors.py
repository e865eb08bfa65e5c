"""Errors that cross service boundaries, in one hierarchy.

    CicadaError
    ├── CheckpointError            a checkpoint is broken or does not fit its model
    │   ├── HeaderError            the header is unreadable: bad length, JSON, dtype or entry
    │   ├── TruncatedCheckpoint    the file ends before its data does
    │   ├── OffsetsError           byte ranges overlap or fall outside the data
    │   ├── DtypeShapeMismatch     dtype × shape disagrees with the tensor's byte length
    │   ├── ShapeMismatch          a tensor's shape or dtype cannot fill the model's slot
    │   ├── MissingTensors         the model needs tensors the checkpoint lacks
    │   └── UnexpectedTensors      the checkpoint holds tensors the model has no place for
    ├── UnsupportedArchitecture    the config names a model we cannot build
    ├── OriginError                the origin refused or failed a request
    │   └── OriginTimeout          the origin stalled past the timeout
    ├── LoadCancelled              the job was cancelled before it finished
    ├── DeadlineExceeded           the job's deadline passed before it finished
    ├── InsufficientMemory         the model does not fit the loader's memory budget
    ├── LoadTimeout                a cold start made no progress within its deadline
    ├── InvalidInput               a request's inputs do not fit the model
    └── MessageTooLarge            a job or its result is larger than the broker accepts

Every error carries a ``kind`` (its class name) so that a failed job can report it over the
wire and a client can match on it without importing this module.
"""

from __future__ import annotations


class CicadaError(Exception):
    """Base of every error Cicada raises on purpose."""

    @property
    def kind(self) -> str:
        return type(self).__name__


class CheckpointError(CicadaError):
    """A checkpoint file is broken or does not fit the model; names the file and tensor."""

    def __init__(self, message: str, *, file: str, tensor: str | None = None) -> None:
        where = f"{file}" if tensor is None else f"{file}, tensor {tensor!r}"
        super().__init__(f"{where}: {message}")
        self.file = file
        self.tensor = tensor


class HeaderError(CheckpointError):
    """The safetensors header cannot be read."""


class TruncatedCheckpoint(CheckpointError):
    """The file ends before the data its header describes."""


class OffsetsError(CheckpointError):
    """Tensor byte ranges overlap or fall outside the data section."""


class DtypeShapeMismatch(CheckpointError):
    """A tensor's dtype and shape need a different number of bytes than its range holds."""


class ShapeMismatch(CheckpointError):
    """A checkpoint tensor cannot fill the model's parameter or buffer of that name."""


class MissingTensors(CheckpointError):
    """The model has parameters or persistent buffers that no checkpoint tensor provides."""

    def __init__(self, names: list[str], *, file: str) -> None:
        shown = ", ".join(sorted(names)[:8]) + (" …" if len(names) > 8 else "")
        super().__init__(f"{len(names)} tensor(s) missing: {shown}", file=file, tensor=names[0])
        self.names = names


class UnexpectedTensors(CheckpointError):
    """The checkpoint holds tensors the model has no place for."""

    def __init__(self, names: list[str], *, file: str) -> None:
        shown = ", ".join(sorted(names)[:8]) + (" …" if len(names) > 8 else "")
        super().__init__(f"{len(names)} unexpected tensor(s): {shown}", file=file, tensor=names[0])
        self.names = names


class UnsupportedArchitecture(CicadaError):
    """The model's config names an architecture we cannot build."""


class OriginError(CicadaError):
    """The origin holding the checkpoint failed a request."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class OriginTimeout(OriginError):
    """The origin sent nothing for longer than the stall timeout."""


class LoadCancelled(CicadaError):
    """The cold start was cancelled before it finished."""


class LoadTimeout(CicadaError):
    """A cold start waited past its deadline for weights that did not come."""


class DeadlineExceeded(CicadaError):
    """The job's deadline passed before it finished."""


class InsufficientMemory(CicadaError):
    """The model is larger than the loader's whole memory budget."""


class InvalidInput(CicadaError):
    """A request's inputs do not fit the model."""


class MessageTooLarge(CicadaError):
    """A message is larger than the broker accepts (RabbitMQ's ``max_message_size``)."""
