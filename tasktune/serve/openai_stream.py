"""Server-sent event streams of the OpenAI API: several choices' events as one stream.

A request with several prompts, or n choices, submits one engine request each; `merged`
interleaves their events as they come and `event_stream` writes them as `data:` chunks
(each naming its choice's index), then the caller's last chunk (usage or an error), then
`[DONE]`. A client that goes away cancels whatever still decodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from tasktune.serve.async_engine import AsyncEngine
from tasktune.serve.sampling import SamplingParams


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices' parameters: a seeded request's choice j draws with seed + j."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + j) % 2**63) for j in range(n)]


async def merged(runner: AsyncEngine, handles: list) -> AsyncIterator[tuple[int, Any]]:
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


def event_stream(runner: AsyncEngine, handles: list, chunk: Callable[[Any, bool, int], dict],
                 last: Callable[[], dict | None]) -> StreamingResponse:
    """One event stream for the choices of `handles`: chunk(event, first of its choice,
    choice index) for every event that says something; last() once all ended (the usage
    chunk, an error chunk, or None)."""

    async def events() -> AsyncIterator[str]:
        seen: set[int] = set()
        try:
            async for i, ev in merged(runner, handles):
                if ev.text or ev.finish_reason or i not in seen or ev.logprobs:
                    yield f"data: {json.dumps(chunk(ev, i not in seen, i))}\n\n"
                    seen.add(i)
            tail = last()
            if tail is not None:
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for seq, _ in handles:
                if not seq.finished:
                    runner.engine.cancel(seq)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
