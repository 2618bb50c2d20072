"""The HTTP app (FastAPI): tasks, predictions, health, Prometheus metrics, the OpenAPI schema.

Every prediction request goes through one Batcher, so concurrent requests for any tasks run
together. Limits: inputs per request, characters per text, bytes per body (413 beyond them);
an unknown task is 404, a malformed body 422. With an API key set, every request without it
(header `X-API-Key: KEY` or `Authorization: Bearer KEY`) gets 401; rescanning the patch folder
over HTTP is offered only then, and needs the key like everything else.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from diffprune import __version__
from diffprune.errors import DiffpruneError
from diffprune.serving.bank import TaskBank, UnknownTask
from diffprune.serving.batcher import Batcher
from diffprune.serving.engine import Engine, Request
from diffprune.serving.metrics import Metrics

Pair = Annotated[list[str], Field(min_length=2, max_length=2, description="A sentence pair: [first, second].")]


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str | Pair] = Field(min_length=1, description="Texts, or sentence pairs as [first, second].")


class Prediction(BaseModel):
    label: str | None = Field(None, description="The most likely label (classification).")
    scores: dict[str, float] | None = Field(None, description="Every label's probability (classification).")
    value: float | None = Field(None, description="The predicted value (regression).")


class PredictResponse(BaseModel):
    task: str
    predictions: list[Prediction]


@dataclass
class Limits:
    max_inputs: int = 64
    max_text_chars: int = 4000
    max_body_bytes: int = 1_000_000


def create_app(bank: TaskBank, *, api_key: str | None = None, limits: Limits | None = None, max_wait: float = 0.005,
               max_batch_rows: int = 64, mixed: bool = True) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics(bank)
    engine = Engine(bank, mixed=mixed)
    batcher = Batcher(engine, max_batch_rows, max_wait, on_batch=metrics.batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()  # finishes every request already queued

    app = FastAPI(title="diffprune", version=__version__, lifespan=lifespan,
                  description="Many tasks served on one shared base model, each a sparse patch.")
    app.state.bank, app.state.engine, app.state.batcher = bank, engine, batcher

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        start = time.perf_counter()
        response = _refusal(request, api_key, limits) or await call_next(request)
        metrics.request(request.url.path, request.method, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health", summary="Whether the server is up, and what it serves")
    def health() -> dict:
        return {"status": "ok", "base": bank.base.name, "fingerprint": bank.base.fingerprint,
                "tasks": len(bank.names()), "loaded": len(bank.loaded_names())}

    @app.get("/tasks", summary="Every served task, and the files refused with the reason")
    def tasks() -> dict:
        return {"tasks": [bank.describe(n) for n in bank.names()], "refused": dict(bank.refused)}

    @app.get("/tasks/{name}", summary="One task", responses={404: {"description": "No such task"}})
    def task(name: str) -> dict:
        return _described(bank, name)

    @app.post("/tasks/{name}/predict", response_model=PredictResponse, response_model_exclude_none=True,
              summary="Predict for texts or sentence pairs",
              responses={404: {"description": "No such task"}, 413: {"description": "Too many or too long inputs"}})
    async def predict(name: str, body: PredictBody, request: HttpRequest) -> dict:
        _described(bank, name)
        if len(await request.body()) > limits.max_body_bytes:
            raise HTTPException(413, f"the body is over {limits.max_body_bytes} bytes")
        inputs = [item if isinstance(item, str) else (item[0], item[1]) for item in body.inputs]
        _check_limits(inputs, limits)
        try:
            predictions = await batcher.submit(Request(name, inputs))
        except UnknownTask as e:
            raise HTTPException(404, str(e)) from e
        except DiffpruneError as e:
            raise HTTPException(503, f"task '{name}' cannot be served: {e}") from e
        metrics.predicted(name, len(inputs))
        return {"task": name, "predictions": predictions}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Metrics in the Prometheus text format")
    def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render(engine)
        return PlainTextResponse(body, media_type=content_type)

    if api_key:
        @app.post("/tasks/rescan", summary="Read the patch folder again (needs the API key)")
        def rescan() -> dict:
            return bank.rescan()

    return app


def _described(bank: TaskBank, name: str) -> dict:
    try:
        return bank.describe(name)
    except UnknownTask as e:
        raise HTTPException(404, str(e)) from e


def _check_limits(inputs: list, limits: Limits) -> None:
    if len(inputs) > limits.max_inputs:
        raise HTTPException(413, f"{len(inputs)} inputs, over the limit of {limits.max_inputs} per request")
    for item in inputs:
        for text in (item,) if isinstance(item, str) else item:
            if len(text) > limits.max_text_chars:
                raise HTTPException(413, f"a text of {len(text)} characters, over the limit of "
                                         f"{limits.max_text_chars}")


def _refusal(request: HttpRequest, api_key: str | None, limits: Limits) -> JSONResponse | None:
    if api_key and not _has_key(request, api_key):
        return JSONResponse({"detail": "this server needs an API key (header X-API-Key or Authorization: Bearer)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        return JSONResponse({"detail": f"the body is over {limits.max_body_bytes} bytes"}, status_code=413)
    return None


def _has_key(request: HttpRequest, api_key: str) -> bool:
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())
