"""The HTTP API: OpenAI-compatible completions and chat over one base and many adapters.

`model` is an adapter name or the base model's name. Errors are JSON
`{"error": {"message", "type", "code"}}`: unknown model or adapter 404, invalid body 422,
bad prompt 400, wrong API key 401, full queue 429. Bodies are bounded in schemas.py so
that no input reaches the engine in a shape it cannot handle.

An encoder run gets its own routes (encoder_api.py) on the same scaffolding (`api_app`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tasktune.errors import TasktuneError
from tasktune.serve import schemas as s
from tasktune.serve.adapter_pool import AdapterError, AdapterNotFound, AdapterPool
from tasktune.serve.encoder_engine import EncoderEngine
from tasktune.serve.async_engine import AsyncEngine
from tasktune.serve.engine import Completion, Engine, Request, completion_of
from tasktune.serve.metrics import Metrics
from tasktune.serve.openai_logprobs import TokenTexts, chat_logprobs, completion_logprobs
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.scheduler import QueueFull
from tasktune.tasks.spec import Task


class TaskPredictor(Protocol):
    """(task name, inputs) -> (prompt, parse), where parse(text) -> (value, valid).
    Raises LookupError for an unknown task and ValueError for unusable inputs."""

    def __call__(self, task: str, inputs: dict[str, Any]) -> tuple[str, Callable[[str], tuple[Any, bool]]]: ...


def task_predictor(tasks: Mapping[str, Task] | None = None) -> TaskPredictor:
    """A TaskPredictor over `tasks` (a served run's own tasks, user-declared ones too),
    else over the built-in registry: the task's first template and its parser."""

    def predict(task_name: str, inputs: dict[str, Any]) -> tuple[str, Callable[[str], tuple[Any, bool]]]:
        from tasktune.tasks.registry import get_task

        if tasks is not None:
            if task_name not in tasks:
                raise LookupError(f"task {task_name!r} is not served here; tasks: {', '.join(tasks)}")
            return _prompt_and_parser(tasks[task_name], inputs)
        try:
            return _prompt_and_parser(get_task(task_name), inputs)
        except TasktuneError as e:
            raise LookupError(str(e)) from None

    return predict


def _prompt_and_parser(task: Task, inputs: dict[str, Any]) -> tuple[str, Callable[[str], tuple[Any, bool]]]:
    from tasktune.tasks.parsers import parse_output
    from tasktune.tasks.render import render
    from tasktune.tasks.spec import Example, Origin

    task = dataclasses.replace(task, templates=task.templates[:1])  # serving uses the canonical template
    inputs = dict(inputs)
    if task.kind == "tagging" and isinstance(inputs.get("tokens", inputs.get("text")), str):
        inputs["tokens"] = str(inputs.get("tokens", inputs.get("text"))).split()
    missing = [f for f in task.input_fields if f not in inputs]
    if missing:
        raise ValueError(f"task {task.name!r} needs input field(s) {missing}")
    target = ["O"] * len(inputs["tokens"]) if task.kind == "tagging" else ""
    example = Example(task=task.name, uid="api", inputs=inputs, target=target, origin=Origin("api", 0))
    try:
        prompt = render(task, example, 0).prompt
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"cannot render task {task.name!r} with these inputs: {e}") from None

    def parse(text: str) -> tuple[Any, bool]:
        parsed = parse_output(task, text, example)
        return parsed.value, parsed.valid

    return prompt, parse


registry_predictor = task_predictor()  # the built-in tasks


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def status_of(e: TasktuneError) -> tuple[int, str]:
    if isinstance(e, AdapterError):
        return e.status, "not_found_error" if isinstance(e, AdapterNotFound) else "adapter_error"
    if isinstance(e, QueueFull):
        return 429, "rate_limit_error"
    return 400, "invalid_request_error"


def render_chat(tokenizer, messages: list[s.ChatMessage]) -> str:
    """The tokenizer's chat template when it has one, else "role: content" lines."""
    msgs = [{"role": m.role, "content": m.content or ""} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject role orders (e.g. two system messages)
            raise APIError(400, f"the chat template rejected these messages: {e}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def api_app(metrics: Metrics, *, api_key: str | None = None, lifespan=None) -> tuple[FastAPI, list]:
    """The app every engine's routes hang on: JSON error bodies, the API key check (the
    returned dependencies) and per-endpoint request counts."""
    app = FastAPI(title="tasktune serve", version="0.1.0", lifespan=lifespan,
                  responses={k: {"model": s.ErrorResponse} for k in (400, 401, 404, 422, 429)})
    app.state.metrics = metrics

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    @app.middleware("http")
    async def count_requests(request: HTTPRequest, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.kind)

    @app.exception_handler(TasktuneError)
    async def _tasktune_error(_, e: TasktuneError):
        status, kind = status_of(e)
        return error_response(status, str(e), kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()[:5]]
        return error_response(422, "invalid request: " + "; ".join(parts), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    return app, [Depends(check_key)]


def create_app(engine: Engine | EncoderEngine, pool: AdapterPool | None = None, *, api_key: str | None = None,
               tasks: TaskPredictor | None = None, task_adapters: Mapping[str, str] | None = None) -> FastAPI:
    """The API over a causal `Engine`, or over an `EncoderEngine` (encoder_api.py).
    `tasks` renders and parses /v1/tasks/{task}/predict (default: the built-in tasks);
    `task_adapters` names the adapter that answers a task when the request names none
    (default: the adapter named like the task, else the base model)."""
    if isinstance(engine, EncoderEngine):
        from tasktune.serve.encoder_api import create_encoder_app  # it builds on this module

        return create_encoder_app(engine, api_key=api_key)
    pool = pool or engine.pool
    runner = AsyncEngine(engine)
    predictor = tasks or registry_predictor
    metrics = Metrics(lambda: len(engine.scheduler.waiting), lambda: len(engine.scheduler.running),
                      lambda: len(pool.resident()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app, auth = api_app(metrics, api_key=api_key, lifespan=lifespan)
    app.state.runner = runner

    def resolve(model: str) -> str | None:
        if model == engine.base_name:
            return None
        if model in pool:
            return model
        raise APIError(404, f"model {model!r} not found; GET /v1/models lists the base and adapters", "not_found_error")

    text_of = TokenTexts(engine.tokenizer)

    def params_of(body: s._Sampling, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        bias = tuple(sorted((int(k), v) for k, v in (body.logit_bias or {}).items()))
        vocab = engine.model.cfg.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", body.stop_token_ids or [])):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise APIError(400, f"{name}: token id {outside[0]} is outside the vocabulary ({vocab} tokens)")
        max_tokens = max_tokens or 16
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=stop, logprobs=logprobs, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=bias, top_k=body.top_k,
                              min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=body.ignore_eos)

    def submit_all(reqs: list[Request]) -> list:
        if len(reqs) > engine.scheduler.max_waiting:
            raise APIError(400, f"this request makes {len(reqs)} sequences (prompts x n); this server queues at "
                                f"most {engine.scheduler.max_waiting}")
        handles = []
        try:
            for r in reqs:
                handles.append(runner.submit(r))
        except BaseException:
            for seq, _ in handles:
                engine.cancel(seq)
            raise
        return handles

    async def finish(handle, endpoint: str, model: str, started: float) -> Completion:
        seq, queue = handle
        async for _ in runner.stream(seq, queue):
            pass
        return record(seq, endpoint, model, started)

    def record(seq, endpoint: str, model: str, started: float) -> Completion:
        c = completion_of(seq)
        if c.finish_reason == "error":
            internal = (c.error or "").startswith("internal")
            raise APIError(503 if internal else 409, c.error or "generation failed", "server_error")
        ttft = seq.first_token_at - seq.arrival if seq.first_token_at else None
        metrics.observe_completion(endpoint, model, c.prompt_tokens, len(c.token_ids), time.monotonic() - started, ttft)
        return c

    def usage(cs: list[Completion], n: int = 1) -> s.Usage:
        """n: choices a prompt (its tokens count once, as OpenAI counts them)."""
        p, g = sum(c.prompt_tokens for c in cs[::n]), sum(len(c.token_ids) for c in cs)
        return s.Usage(prompt_tokens=p, completion_tokens=g, total_tokens=p + g)

    def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
        """n choices' parameters: a seeded request's choice j draws with seed + j."""
        if params.seed is None:
            return [params] * n
        return [dataclasses.replace(params, seed=(params.seed + j) % 2**63) for j in range(n)]

    async def merged(handles: list) -> AsyncIterator[tuple[int, Any]]:
        """Several requests' events as they come, each with its request's index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            try:
                async for ev in runner.stream(*handle):
                    queue.put_nowait((i, ev))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            left = len(tasks)
            while left:
                i, ev = await queue.get()
                if ev is None:
                    left -= 1
                else:
                    yield i, ev
        finally:
            for t in tasks:
                t.cancel()

    def sse(handles: list, endpoint: str, model: str, started: float, chunk: Callable[[Any, bool, int], dict],
            usage_chunk: dict | None = None, n: int = 1):
        """One event stream for the choices of `handles` (chunk(event, first of its choice,
        choice index)); usage_chunk: stream_options.include_usage's last chunk, less its usage."""

        async def events() -> AsyncIterator[str]:
            seen: set[int] = set()
            try:
                async for i, ev in merged(handles):
                    if ev.text or ev.finish_reason or i not in seen or ev.logprobs:
                        yield f"data: {json.dumps(chunk(ev, i not in seen, i))}\n\n"
                        seen.add(i)
                try:
                    cs = [record(seq, endpoint, model, started) for seq, _ in handles]
                    if usage_chunk is not None:
                        yield f"data: {json.dumps({**usage_chunk, 'usage': usage(cs, n).model_dump()})}\n\n"
                except APIError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.status}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for seq, _ in handles:
                    if not seq.finished:
                        engine.cancel(seq)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=s.CompletionResponse, dependencies=auth)
    async def completions(body: s.CompletionRequest):
        started, adapter = time.monotonic(), resolve(body.model)
        one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if one else body.prompt
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's log-probabilities) is not supported by this server")
        n = body.n  # choice i * n + j is prompt i's j-th
        params = choice_params(params_of(body, body.max_tokens, body.logprobs), n)
        handles = submit_all([Request(p, adapter, params[j], stream=body.stream) for p in prompts for j in range(n)])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

        def echoed(prompt: str | list[int]) -> str:
            return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)

        def logprobs(lps, offset: int = 0) -> s.CompletionLogprobs | None:
            if body.logprobs is None:
                return None
            return completion_logprobs(lps, text_of, body.logprobs > 0, offset)

        if body.stream:
            offsets = [0] * len(handles)

            def chunk(ev, first, i):
                lp = logprobs(ev.logprobs, offsets[i])
                if lp is not None and lp.tokens:
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                text = echoed(prompts[i // n]) + ev.text if first and body.echo else ev.text
                return {**head, "choices": [{"index": i, "text": text, "finish_reason": ev.finish_reason,
                                             "logprobs": lp.model_dump() if lp is not None else None}]}
            include = body.stream_options is not None and body.stream_options.include_usage
            return sse(handles, "/v1/completions", body.model, started, chunk, {**head, "choices": []} if include else None,
                       n)
        try:
            cs = [await finish(h, "/v1/completions", body.model, started) for h in handles]
        finally:
            for seq, _ in handles:  # a failed or abandoned request must not keep decoding
                if not seq.finished:
                    engine.cancel(seq)
        choices = [s.CompletionChoice(index=i, text=echoed(prompts[i // n]) + c.text if body.echo else c.text,
                                      finish_reason=c.finish_reason, logprobs=logprobs(c.logprobs))
                   for i, c in enumerate(cs)]
        return s.CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage(cs, n))

    @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse, dependencies=auth)
    async def chat(body: s.ChatCompletionRequest):
        started, adapter = time.monotonic(), resolve(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true")
        prompt = render_chat(engine.tokenizer, body.messages)
        params = choice_params(params_of(body, body.max_completion_tokens or body.max_tokens,
                                         (body.top_logprobs or 0) if body.logprobs else None), body.n)
        handles = submit_all([Request(prompt, adapter, p, stream=body.stream) for p in params])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        if body.stream:
            def chunk(ev, first, i):
                delta = {"role": "assistant", "content": ev.text} if first else {"content": ev.text}
                lp = chat_logprobs(ev.logprobs, text_of).model_dump() if body.logprobs else None
                return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                             "finish_reason": ev.finish_reason}]}
            include = body.stream_options is not None and body.stream_options.include_usage
            return sse(handles, "/v1/chat/completions", body.model, started, chunk,
                       {**head, "choices": []} if include else None, body.n)
        try:
            cs = [await finish(h, "/v1/chat/completions", body.model, started) for h in handles]
        finally:
            for seq, _ in handles:
                if not seq.finished:
                    engine.cancel(seq)
        choices = [s.ChatChoice(index=i, message=s.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                                logprobs=chat_logprobs(c.logprobs, text_of) if body.logprobs else None)
                   for i, c in enumerate(cs)]
        return s.ChatCompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                        usage=usage(cs, body.n))

    @app.get("/v1/models", response_model=s.ModelList, dependencies=auth)
    async def models():
        cards = [s.ModelCard(id=engine.base_name, root=engine.base_name)]
        cards += [s.ModelCard(id=n, root=n, parent=engine.base_name) for n in pool.names()]
        return s.ModelList(data=cards)

    def adapter_out(name: str) -> s.AdapterOut:
        i = pool.info(name)
        return s.AdapterOut(name=i.name, rank=i.rank, scaling=i.scaling, target_modules=list(i.modules),
                            base_model=i.base_model)

    @app.get("/v1/adapters", response_model=list[s.AdapterOut], dependencies=auth)
    async def list_adapters():
        return [adapter_out(n) for n in pool.names()]

    @app.post("/v1/adapters", response_model=s.AdapterOut, status_code=201, dependencies=auth)
    async def load_adapter(body: s.AdapterLoadRequest):
        if pool.root is None:
            raise APIError(403, "loading adapters over HTTP is disabled: the server has no adapter root",
                           "permission_error")
        pool.register(body.name, body.path)
        return adapter_out(body.name)

    @app.delete("/v1/adapters/{name}", dependencies=auth)
    async def unload_adapter(name: str):
        pool.unregister(name)
        return {"deleted": name}

    @app.post("/v1/tasks/{task}/predict", response_model=s.TaskPredictResponse, dependencies=auth)
    async def predict(task: str, body: s.TaskPredictRequest):
        started = time.monotonic()
        try:
            prompt, parse = predictor(task, body.inputs)
        except LookupError as e:
            raise APIError(404, str(e).strip("'\""), "not_found_error") from None
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(422, f"invalid inputs for task {task!r}: {e}") from None
        model = body.model or (task_adapters or {}).get(task) or (task if task in pool else engine.base_name)
        handle = submit_all([Request(prompt, resolve(model), SamplingParams(max_tokens=body.max_tokens, logprobs=0))])[0]
        c = await finish(handle, "/v1/tasks/{task}/predict", model, started)
        value, valid = parse(c.text)
        score = math.exp(sum(lp.logprob for lp in c.logprobs))  # the greedy answer's probability
        return s.TaskPredictResponse(task=task, model=model, prediction=value, valid=bool(valid), text=c.text,
                                     score=score)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": engine.base_name, "adapters": len(pool), "running": len(engine.scheduler.running),
                "waiting": len(engine.scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


__all__ = ["APIError", "TaskPredictor", "api_app", "create_app", "registry_predictor", "task_predictor"]
