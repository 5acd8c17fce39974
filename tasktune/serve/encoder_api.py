"""HTTP routes over an `EncoderEngine`: task predictions, no text generation.

`POST /v1/tasks/{task}/predict` answers in the causal path's `TaskPredictResponse`: the
label with its probability and the top labels (classification), or one BIO tag per word
and the slots (tagging). Concurrent requests share forwards (`EncoderEngine.submit`), so
requests for different tasks meet in one batch, each row on its own adapter and head.
`/v1/completions` and `/v1/chat/completions` answer 400: an encoder writes no text.
"""

from __future__ import annotations

import dataclasses
import time

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tasktune.serve import schemas as s
from tasktune.serve.api_app import APIError, api_app
from tasktune.serve.encoder_engine import EncoderEngine
from tasktune.serve.metrics import Metrics

PREDICT = "/v1/tasks/{task}/predict"
NO_TEXT = "this server hosts an encoder run: use /v1/tasks/{task}/predict"


def create_encoder_app(engine: EncoderEngine, *, api_key: str | None = None) -> FastAPI:
    metrics = Metrics(lambda: engine.waiting, lambda: engine.running, lambda: len(engine.adapters))
    app, auth = api_app(metrics, api_key=api_key)

    @app.post("/v1/completions", dependencies=auth)
    @app.post("/v1/chat/completions", dependencies=auth)
    async def no_generation():
        raise APIError(400, NO_TEXT)

    @app.post(PREDICT, response_model=s.TaskPredictResponse, dependencies=auth)
    async def predict(task: str, body: s.TaskPredictRequest):
        started = time.monotonic()
        try:
            example = engine.example(task, body.inputs)
        except LookupError as e:
            raise APIError(404, str(e), "not_found_error") from None
        except ValueError as e:
            raise APIError(422, f"invalid inputs for task {task!r}: {e}") from None
        adapter = engine.adapter_of(task)
        if body.model not in (None, task, adapter):
            raise APIError(400, f"task {task!r} is answered by its own adapter ({adapter}) and head: leave out model")
        answer = await run_in_threadpool(engine.submit, example, top_k=body.top_k)
        metrics.latency.labels(PREDICT).observe(time.monotonic() - started)
        tagging = engine.tasks[task].kind == "tagging"
        return s.TaskPredictResponse(
            task=task, model=answer.adapter or engine.name, prediction=answer.value, valid=True, text=answer.text,
            score=answer.score,
            top=None if tagging else [s.LabelScore(label=label, score=p) for label, p in answer.top],
            slots=[s.SlotSpan(**dataclasses.asdict(x)) for x in answer.slots] if tagging else None,
        )

    @app.get("/v1/models", response_model=s.ModelList, dependencies=auth)
    async def models():
        """The base model, then one card per task, rooted at the adapter that serves it."""
        cards = [s.ModelCard(id=engine.name, root=engine.name)]
        cards += [s.ModelCard(id=t, root=engine.adapter_of(t) or engine.name, parent=engine.name) for t in engine.tasks]
        return s.ModelList(data=cards)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": engine.name, "adapters": len(engine.adapters), "tasks": list(engine.tasks),
                "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
