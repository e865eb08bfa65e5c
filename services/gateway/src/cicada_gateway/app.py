"""The gateway: Open Inference Protocol v2 over REST, in front of the mesh. No torch here.

Health, server and model metadata, synchronous ``infer``, asynchronous jobs, the model
repository, Prometheus ``/metrics``; OpenAPI at ``/openapi.json``. Every error is
``{"error": "..."}``: 4xx for what the request got wrong, 502/504 when a model's origin fails,
503/504 when the mesh cannot serve.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cicada_gateway.metrics import Metrics
from cicada_gateway.protocol import (
    BadRequest,
    FastJSON,
    InferenceRequest,
    RegisterBody,
    number_param,
    priority_of,
    to_json,
    to_wire,
)
from cicada_shared.bus import Bus
from cicada_shared.contracts import (
    CancelRequest,
    ErrorInfo,
    GetJob,
    GetModel,
    Health,
    InferJob,
    JobResult,
    ListModels,
    RegisterModel,
    Reply,
    Tensor,
    UnregisterModel,
    check_payload,
)
from cicada_shared.errors import MessageTooLarge
from cicada_shared.settings import MeshSettings
from cicada_shared.topology import JOB_ROUTING_KEY
from cicada_shared.uris import InvalidURI, check_uri

log = structlog.get_logger("cicada.gateway")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: HTTP status for each error kind a job or request can end with; others mean "cannot serve".
STATUS: dict[str, int] = {
    "InvalidInput": 400,
    "InvalidMessage": 400,
    "InvalidURI": 400,
    "OriginError": 502,
    "OriginTimeout": 504,
    "UnknownModel": 404,
    "UnknownJob": 404,
    "JobFinished": 409,
    "HeaderError": 422,
    "TruncatedCheckpoint": 422,
    "OffsetsError": 422,
    "DtypeShapeMismatch": 422,
    "CheckpointError": 422,
    "UnsupportedArchitecture": 422,
    "MessageTooLarge": 413,
    "DeadlineExceeded": 504,
}


class GatewaySettings(MeshSettings):
    gateway_host: str = Field("0.0.0.0", description="Address to listen on.")
    gateway_port: int = Field(8000, description="Port to listen on.")
    gateway_max_body_bytes: int = Field(64 << 20, description="Larger request bodies get 413.")
    gateway_timeout_s: float = Field(600.0, description="How long infer waits for a result.")
    gateway_rpc_timeout_s: float = Field(10.0, description="How long a scheduler query waits.")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def fail(error: ErrorInfo) -> ApiError:
    return ApiError(STATUS.get(error.kind, 503), error.message)


class Mesh:
    """The gateway's side of the bus."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.bus = Bus.for_settings(settings, client="gateway")
        self.accepted: OrderedDict[str, float] = OrderedDict()  # async jobs, recently

    async def call(self, message: Any) -> Reply:
        try:
            return await self.bus.call(
                message,
                self.settings.names.scheduler_rpc,
                timeout_s=self.settings.gateway_rpc_timeout_s,
            )
        except TimeoutError as exc:
            raise ApiError(503, "the scheduler did not answer in time") from exc

    async def infer(self, job: InferJob, timeout_s: float) -> JobResult:
        try:
            answer = await self.bus.request(
                job,
                JOB_ROUTING_KEY,
                exchange="jobs",
                timeout_s=timeout_s,
                correlation_id=job.job_id,
                priority=job.priority,
                persistent=True,
            )
        except TimeoutError as exc:
            raise ApiError(
                504, f"no result within {timeout_s:g}s; the job goes on: GET /v2/jobs/{job.job_id}"
            ) from exc
        if not isinstance(answer, JobResult):
            raise ApiError(503, f"unexpected answer {answer.kind!r}")
        return answer

    async def submit(self, job: InferJob) -> None:
        await self.bus.publish(
            job, JOB_ROUTING_KEY, exchange="jobs", priority=job.priority, persistent=True
        )
        self.accepted[job.job_id] = time.time()
        while len(self.accepted) > 10_000:
            self.accepted.popitem(last=False)


class CountRequests:
    """Counts requests by route template and status (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, status[0]).inc()


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by header or as they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(
                send,
                413,
                f"request body of {int(declared)} bytes exceeds the {self.limit}-byte limit",
            )
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body exceeds the {self.limit}-byte limit")
            return message

        await self.app(scope, limited, send)


class JsonBodies:
    """Every POST body is JSON, whatever its content type says (``curl -d`` says form data),
    as KServe and Triton read it; the binary tensor extension is refused by name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        if any(k == b"inference-header-content-length" for k, _ in headers):
            await _send_json(
                send, 415, "the binary tensor data extension is not supported; send JSON tensors"
            )
            return
        headers.append((b"content-type", b"application/json"))
        scope["headers"] = headers  # in place: the route found below is counted above
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, error: str) -> None:
    body = JSONResponse({"error": error}, status_code=status)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body.body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.body})


def create_app(settings: GatewaySettings) -> FastAPI:
    mesh = Mesh(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await mesh.bus.connect()
        log.info("gateway_ready", port=settings.gateway_port)
        yield
        await mesh.bus.close()

    app = FastAPI(
        title="Cicada mesh",
        version="0.1.0",
        lifespan=lifespan,
        description="Serverless inference built for the cold start. Open Inference "
        "Protocol v2, plus asynchronous jobs and a model repository.",
    )
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes)
    app.state.mesh, app.state.metrics = mesh, metrics

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(MessageTooLarge)
    async def too_large(_: Request, exc: MessageTooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _describe(exc)}, status_code=400)

    @app.exception_handler(ConnectionError)
    async def broker_down(_: Request, exc: ConnectionError) -> JSONResponse:
        return JSONResponse({"error": f"the mesh is unreachable: {exc}"}, status_code=503)

    # -- health and metadata ---------------------------------------------------------------

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        try:
            reply = await mesh.call(Health())
        except (ApiError, ConnectionError, AssertionError) as exc:
            return JSONResponse({"ready": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"ready": True, **reply.data})

    @app.get("/v2")
    async def server() -> dict[str, Any]:
        return {
            "name": "cicada-mesh",
            "version": "0.1.0",
            "extensions": ["model_repository", "async_jobs", "priorities"],
        }

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        model = await _model(name, version)
        return {
            "name": name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": model["inputs"],
            "outputs": model["outputs"],
            "parameters": {
                k: model[k] for k in ("state", "uri", "bytes", "resident_on", "model_type")
            },
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        model = await _model(name, version)
        ok = model["state"] == "ready"
        return JSONResponse(
            {"name": name, "ready": ok, "state": model["state"]}, status_code=200 if ok else 503
        )

    async def _model(name: str, version: str | None) -> dict[str, Any]:
        if version not in (None, "1"):
            raise ApiError(404, f"model {name!r} has no version {version!r} (only '1')")
        return _data(await mesh.call(GetModel(model=name)))

    # -- inference -------------------------------------------------------------------------

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, body: InferenceRequest, version: str | None = None) -> JSONResponse:
        """Run the model and wait for the result (a cold start if it is not resident)."""
        if version not in (None, "1"):
            raise ApiError(404, f"model {name!r} has no version {version!r} (only '1')")
        job = _job(name, body, settings.payload_limit)
        timeout = number_param(body, "timeout_s") or settings.gateway_timeout_s
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            result = await mesh.infer(job, timeout)
        finally:
            metrics.in_flight.dec()
        metrics.observe(result)
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        if result.state == "cancelled":
            raise ApiError(409, f"job {job.job_id} was cancelled")
        if result.error is not None:
            raise fail(result.error)
        return FastJSON(
            {
                "model_name": name,
                "model_version": "1",
                "id": body.id or job.job_id,
                "parameters": _summary(result),
                "outputs": [to_json(t) for t in result.outputs],
            }
        )

    @app.post("/v2/models/{name}/jobs", status_code=202)
    @app.post("/v2/models/{name}/versions/{version}/jobs", status_code=202)
    async def submit(
        name: str, body: InferenceRequest, response: Response, version: str | None = None
    ) -> dict[str, Any]:
        """Queue a job; answers once the broker has it. Poll ``GET /v2/jobs/{id}``."""
        if version not in (None, "1"):
            raise ApiError(404, f"model {name!r} has no version {version!r} (only '1')")
        job = _job(name, body, settings.payload_limit)
        await mesh.submit(job)
        response.headers["Location"] = f"/v2/jobs/{job.job_id}"
        return {"id": job.job_id, "model": name, "state": "queued"}

    @app.get("/v2/jobs/{job_id}")
    async def job_status(job_id: str) -> Response:
        reply = await mesh.call(GetJob(job_id=job_id))
        if (
            not reply.ok
            and job_id in mesh.accepted
            and reply.error
            and (reply.error.kind == "UnknownJob")
        ):
            return FastJSON({"id": job_id, "state": "queued"})  # on its way to the scheduler
        doc = _data(reply)
        doc["outputs"] = [to_json(Tensor(**t)) for t in doc.get("outputs", [])]
        return FastJSON(doc)

    @app.delete("/v2/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        return _data(await mesh.call(CancelRequest(job_id=job_id)))

    # -- model repository ------------------------------------------------------------------

    @app.post("/v2/repository/models/{name}")
    async def register(name: str, body: RegisterBody) -> dict[str, Any]:
        """Register a Hugging Face-format model directory (config.json + safetensors)."""
        if not MODEL_NAME.match(name):
            raise ApiError(400, f"model name {name!r}: use letters, digits, '.', '_', '-'")
        try:
            uri = check_uri(body.uri, settings.roots)
        except InvalidURI as exc:
            raise ApiError(400, str(exc)) from exc
        return _data(await mesh.call(RegisterModel(model=name, uri=uri)))

    @app.delete("/v2/repository/models/{name}")
    async def unregister(name: str) -> dict[str, Any]:
        return _data(await mesh.call(UnregisterModel(model=name)))

    @app.get("/v2/repository/index")
    @app.post("/v2/repository/index")
    async def index() -> list[dict[str, Any]]:
        models = _data(await mesh.call(ListModels()))["models"]
        return [
            {
                "name": m["name"],
                "version": "1",
                "state": m["state"],
                "uri": m["uri"],
                "resident_on": m["resident_on"],
            }
            for m in models
        ]

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _job(name: str, body: InferenceRequest, limit: int) -> InferJob:
    names = [i.name for i in body.inputs]
    if len(set(names)) != len(names):
        raise BadRequest(f"inputs repeat a name: {names}")
    deadline = number_param(body, "deadline_s")
    inputs = [to_wire(i) for i in body.inputs]
    check_payload(inputs, limit, "inputs")  # 413
    return InferJob(
        job_id=uuid.uuid4().hex,
        model=name,
        inputs=inputs,
        outputs=[o.name for o in body.outputs] if body.outputs else None,
        priority=priority_of(body),
        submitted_at=time.time(),
        deadline_s=time.time() + deadline if deadline else None,
    )


def _summary(result: JobResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": result.job_id,
        "cold_start": result.cold,
        "loader": result.loader_id,
        "queue_s": result.queue_s,
        "compute_s": result.compute_s,
    }
    for key in ("e2e_s", "ttfl_s", "utilization", "bytes"):
        if key in result.timeline:
            out[key] = result.timeline[key]
    return out


def _data(reply: Reply) -> dict[str, Any]:
    if not reply.ok:
        raise fail(reply.error or ErrorInfo(kind="Error", message="request failed"))
    return reply.data


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid")
            parts.append(f"malformed JSON at character {loc[-1] if loc else '?'}: {reason}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
