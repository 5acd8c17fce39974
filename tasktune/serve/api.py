"""The HTTP API: OpenAI-compatible completions and chat over one base and many adapters.

`model` is an adapter name or the base model's name. Errors are JSON
`{"error": {"message", "type", "code"}}`: unknown model or adapter 404, invalid body 422,
bad prompt 400, wrong API key 401, full queue 429. Bodies are bounded in schemas.py so
that no input reaches the engine in a shape it cannot handle.

An encoder run gets its own routes (encoder_api.py) on the same scaffolding (api_app.py).
"""

from __future__ import annotations

import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable, Mapping

from fastapi import FastAPI
from fastapi.responses import Response

from tasktune import __version__
from tasktune.data.tokenize import encode_prompt
from tasktune.serve import schemas as s
from tasktune.serve.adapter_pool import AdapterPool
from tasktune.serve.adapter_routes import add_adapter_routes
from tasktune.serve.api_app import APIError, api_app
from tasktune.serve.async_engine import AsyncEngine
from tasktune.serve.branch_scoring import pack_branches
from tasktune.serve.encoder_engine import EncoderEngine
from tasktune.serve.torch_thread import TorchThread
from tasktune.serve.engine import Completion, Engine, Request, completion_of
from tasktune.serve.grammar import GrammarError
from tasktune.serve.guided import encode_answers
from tasktune.serve.metrics import Metrics
from tasktune.serve.openai_logprobs import TokenTexts, chat_logprobs, completion_logprobs, prompt_logprobs, trimmed
from tasktune.serve.openai_stream import choice_params, event_stream
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.task_predictor import TaskPredictor, label_probabilities, registry_predictor


def render_chat(tokenizer, messages: list[s.ChatMessage]) -> str:
    """The tokenizer's chat template when it has one, else "role: content" lines."""
    msgs = [{"role": m.role, "content": m.content or ""} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject role orders (e.g. two system messages)
            raise APIError(400, f"the chat template rejected these messages: {e}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def create_app(engine: Engine | EncoderEngine, pool: AdapterPool | None = None, *, api_key: str | None = None,
               tasks: TaskPredictor | None = None, task_adapters: Mapping[str, str] | None = None,
               torch_thread: TorchThread | None = None) -> FastAPI:
    """The API over a causal `Engine`, or over an `EncoderEngine` (encoder_api.py).
    `tasks` renders and parses /v1/tasks/{task}/predict (default: the built-in tasks);
    `task_adapters` names the adapter that answers a task when the request names none
    (default: the adapter named like the task, else the base model); `torch_thread`, the
    thread that loaded the engine, steps it (AsyncEngine)."""
    if isinstance(engine, EncoderEngine):
        from tasktune.serve.encoder_api import create_encoder_app  # it builds on this module

        return create_encoder_app(engine, api_key=api_key)
    pool = pool or engine.pool
    runner = AsyncEngine(engine, torch_thread)
    predictor = tasks or registry_predictor
    metrics = Metrics(lambda: len(engine.scheduler.waiting), lambda: len(engine.scheduler.running),
                      lambda: len(pool.resident()), lambda: pool.loads,
                      lambda: (engine.decode_step.ahead_used, engine.decode_step.ahead_wasted))

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

    def encode_choices(texts, field: str) -> tuple[tuple[int, ...], ...]:
        try:
            return encode_answers(engine.tokenizer, texts or (), engine.model.cfg.vocab_size)
        except ValueError as e:
            raise APIError(400, f"{field}: {e}") from None

    def params_of(body: s._Sampling, max_tokens: int | None, logprobs: int | None = None,
                  prompt_logprobs: int | None = None) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        bias = tuple(sorted((int(k), v) for k, v in (body.logit_bias or {}).items()))
        vocab = engine.model.cfg.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", body.stop_token_ids or [])):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise APIError(400, f"{name}: token id {outside[0]} is outside the vocabulary ({vocab} tokens)")
        max_tokens = 16 if max_tokens is None else max_tokens
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})")
        if body.truncate_prompt_tokens is not None and getattr(body, "echo", False):
            raise APIError(400, "truncate_prompt_tokens cannot be combined with echo (which prompt would it echo?)")
        if body.prompt_logprobs is not None and body.stream:
            raise APIError(400, "prompt_logprobs cannot be streamed (as in vLLM); ask for it without stream")
        grammar = grammar_of(body)
        if (body.guided_choice or grammar is not None) and (body.min_tokens or body.ignore_eos):
            raise APIError(400, f"{'guided_choice' if body.guided_choice else 'a grammar'} cannot be combined with "
                                "min_tokens or ignore_eos")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=stop, logprobs=logprobs, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=bias, top_k=body.top_k,
                              min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output,
                              prompt_logprobs=prompt_logprobs, truncate_prompt_tokens=body.truncate_prompt_tokens,
                              choices=encode_choices(body.guided_choice, "guided_choice"), grammar=grammar)

    def prompt_entries(seq, k: int | None) -> s.PromptLogprobs | None:
        """A finished sequence's prompt_logprobs in vLLM's shape, if the request asked (k)."""
        return None if k is None else prompt_logprobs(seq.prompt_logprobs, text_of, k)

    def grammar_of(body: s._Sampling):
        """The compiled grammar of guided_json, guided_regex, guided_grammar or a JSON response_format (None:
        free text); two ways to guide one request are refused."""
        rf = body.response_format if body.response_format is not None and body.response_format.type != "text" else None
        given = [name for name, v in (("guided_choice", body.guided_choice), ("guided_json", body.guided_json),
                                      ("guided_regex", body.guided_regex), ("guided_grammar", body.guided_grammar),
                                      ("response_format", rf)) if v is not None]
        if len(given) > 1:
            raise APIError(400, f"give one of {' and '.join(given)}, not both")
        if not given or given[0] == "guided_choice":
            return None
        try:
            if body.guided_json is not None:
                return engine.grammars.json_schema(body.guided_json)
            if body.guided_regex is not None:
                return engine.grammars.regex(body.guided_regex)
            if body.guided_grammar is not None:
                return engine.grammars.ebnf(body.guided_grammar)
            schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
            return engine.grammars.json_object() if schema is None else engine.grammars.json_schema(schema)
        except GrammarError as e:
            raise APIError(400, f"{given[0]}: {e}") from None

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

    async def finish_all(handles: list, endpoint: str, model: str, started: float) -> list[Completion]:
        """Every handle's completion; a failed or abandoned request must not keep decoding."""
        try:
            return [await finish(h, endpoint, model, started) for h in handles]
        finally:
            for seq, _ in handles:
                if not seq.finished:
                    engine.cancel(seq)

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

    def sse(handles: list, endpoint: str, model: str, started: float, chunk: Callable[[Any, bool, int], dict],
            usage_chunk: dict | None = None, n: int = 1):
        """The choices of `handles` as one event stream (openai_stream.py); usage_chunk:
        stream_options.include_usage's last chunk, less its usage."""

        def last() -> dict | None:
            try:
                cs = [record(seq, endpoint, model, started) for seq, _ in handles]
            except APIError as e:
                return {"error": {"message": e.message, "type": e.kind, "code": e.status}}
            return None if usage_chunk is None else {**usage_chunk, "usage": usage(cs, n).model_dump()}

        return event_stream(runner, handles, chunk, last)

    @app.post("/v1/completions", response_model=s.CompletionResponse, dependencies=auth)
    async def completions(body: s.CompletionRequest):
        started, adapter = time.monotonic(), resolve(body.model)
        one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if one else body.prompt
        n = body.n  # choice i * n + j is prompt i's j-th
        scored = body.logprobs if body.echo else None  # echo + logprobs: the prompt's tokens' entries too
        asked = [k for k in (scored, body.prompt_logprobs) if k is not None]
        params = choice_params(params_of(body, body.max_tokens, body.logprobs, max(asked, default=None)), n)
        handles = submit_all([Request(p, adapter, params[j], stream=body.stream) for p in prompts for j in range(n)])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

        def echoed(prompt: str | list[int]) -> str:
            return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)

        def logprobs(lps, offset: int = 0, echoed_seq=None) -> s.CompletionLogprobs | None:
            """echoed_seq: the choice's sequence, whose prompt's entries go first (echo)."""
            if body.logprobs is None:
                return None
            if scored is not None and echoed_seq is not None:
                return completion_logprobs(trimmed(echoed_seq.prompt_logprobs, body.logprobs) + lps, text_of,
                                           body.logprobs > 0, offset,
                                           echoed_seq.prompt_ids + [lp.token for lp in lps])
            return completion_logprobs(lps, text_of, body.logprobs > 0, offset)

        if body.stream:
            offsets = [0] * len(handles)

            def chunk(ev, first, i):
                lp = logprobs(ev.logprobs, offsets[i], handles[i][0] if first else None)
                if lp is not None and lp.tokens:
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                text = echoed(prompts[i // n]) + ev.text if first and body.echo else ev.text
                return {**head, "choices": [{"index": i, "text": text, "finish_reason": ev.finish_reason,
                                             "logprobs": lp.model_dump() if lp is not None else None}]}
            include = body.stream_options is not None and body.stream_options.include_usage
            return sse(handles, "/v1/completions", body.model, started, chunk, {**head, "choices": []} if include else None,
                       n)
        cs = await finish_all(handles, "/v1/completions", body.model, started)
        choices = [s.CompletionChoice(index=i, text=echoed(prompts[i // n]) + c.text if body.echo else c.text,
                                      finish_reason=c.finish_reason, logprobs=logprobs(c.logprobs, 0, seq),
                                      prompt_logprobs=prompt_entries(seq, body.prompt_logprobs))
                   for i, (c, (seq, _)) in enumerate(zip(cs, handles))]
        return s.CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage(cs, n))

    @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse, dependencies=auth)
    async def chat(body: s.ChatCompletionRequest):
        started, adapter = time.monotonic(), resolve(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true")
        prompt = render_chat(engine.tokenizer, body.messages)
        params = choice_params(params_of(body, body.max_completion_tokens or body.max_tokens,
                                         (body.top_logprobs or 0) if body.logprobs else None, body.prompt_logprobs),
                               body.n)
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
        cs = await finish_all(handles, "/v1/chat/completions", body.model, started)
        choices = [s.ChatChoice(index=i, message=s.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                                logprobs=chat_logprobs(c.logprobs, text_of) if body.logprobs else None)
                   for i, c in enumerate(cs)]
        return s.ChatCompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                        usage=usage(cs, body.n),
                                        prompt_logprobs=prompt_entries(handles[0][0], body.prompt_logprobs))

    @app.get("/v1/models", response_model=s.ModelList, dependencies=auth)
    async def models():
        cards = [s.ModelCard(id=engine.base_name, root=engine.base_name, max_model_len=engine.max_len)]
        cards += [s.ModelCard(id=n, root=n, parent=engine.base_name, max_model_len=engine.max_len)
                  for n in pool.names()]
        return s.ModelList(data=cards)

    @app.post("/tokenize", response_model=s.TokenizeResponse, dependencies=auth)
    async def tokenize(body: s.TokenizeRequest):
        if body.model is not None:
            resolve(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages")
        text = body.prompt if body.prompt is not None else render_chat(engine.tokenizer, body.messages)
        ids = engine.tokenizer.encode(text)
        return s.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_len)

    @app.post("/detokenize", response_model=s.DetokenizeResponse, dependencies=auth)
    async def detokenize(body: s.DetokenizeRequest):
        if body.model is not None:
            resolve(body.model)
        vocab = engine.model.cfg.vocab_size
        outside = [t for t in body.tokens if t >= vocab]
        if outside:
            raise APIError(400, f"tokens: token id {outside[0]} is outside the vocabulary ({vocab} tokens)")
        return s.DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    add_adapter_routes(app, pool, auth)

    async def predict_by_likelihood(task: str, model: str, query, top_k: int, started: float) -> s.TaskPredictResponse:
        """A closed-set task, as `tasktune eval` answers it (model/predict.py, score_labels):
        each label's whole target and the end token scored after the prompt (both encoded as
        training encodes them), the labels as branches of one prompt (branch_scoring.py: one
        prefill, or one per group of labels that fits the context); the likeliest label, its
        probability among the labels, and the top_k."""
        tok = engine.tokenizer
        prompt = encode_prompt(tok, query.prompt)
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        targets = [tok(a, add_special_tokens=False)["input_ids"] + end for a in query.answers]
        adapter, params = resolve(model), SamplingParams(max_tokens=0)
        packs = pack_branches(len(prompt), [len(t) for t in targets], engine.max_len - 1)
        handles = submit_all([Request(prompt, adapter, params, branches=[targets[i] for i in p]) for p in packs])
        cs = await finish_all(handles, "/v1/tasks/{task}/predict", model, started)
        probs = label_probabilities([sum(lps) for c in cs for lps in c.branch_logprobs])
        ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
        best = ranked[0]
        return s.TaskPredictResponse(task=task, model=model, prediction=query.labels[best], valid=True,
                                     text=query.answers[best], score=probs[best],
                                     top=[s.LabelScore(label=query.labels[i], score=probs[i]) for i in ranked[:top_k]])

    @app.post("/v1/tasks/{task}/predict", response_model=s.TaskPredictResponse, dependencies=auth)
    async def predict(task: str, body: s.TaskPredictRequest):
        started = time.monotonic()
        try:
            query = predictor(task, body.inputs)
        except LookupError as e:
            raise APIError(404, str(e).strip("'\""), "not_found_error") from None
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(422, f"invalid inputs for task {task!r}: {e}") from None
        model = body.model or (task_adapters or {}).get(task) or (task if task in pool else engine.base_name)
        if body.guided and query.answers:
            return await predict_by_likelihood(task, model, query, body.top_k, started)
        grammar = None
        if body.guided and query.grammar:  # a tagging answer: only the task's slots and spans of the input
            try:
                grammar = engine.grammars.ebnf(query.grammar)
            except GrammarError as e:
                raise APIError(422, f"cannot constrain task {task!r}'s answer to its slots ({e}); send "
                                    '"guided": false to decode freely') from None
        params = SamplingParams(max_tokens=body.max_tokens, logprobs=0, grammar=grammar)
        c, = await finish_all(submit_all([Request(query.prompt, resolve(model), params)]), "/v1/tasks/{task}/predict",
                              model, started)
        value, valid = query.parse(c.text)
        score = math.exp(sum(lp.logprob for lp in c.logprobs))  # the greedy answer's probability
        return s.TaskPredictResponse(task=task, model=model, prediction=value, valid=bool(valid), text=c.text,
                                     score=score)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": engine.base_name, "adapters": len(pool), "running": len(engine.scheduler.running),
                "waiting": len(engine.scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


__all__ = ["create_app"]
