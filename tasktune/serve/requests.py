"""What the engine takes and gives back: a request, its completion, and the error for a
prompt that does not fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasktune.errors import TasktuneError
from tasktune.serve.sampling import SamplingParams, TokenLogprob
from tasktune.serve.scheduler import Sequence


class PromptTooLong(TasktuneError):
    """The prompt leaves no room to generate within the engine's max_len (HTTP 400)."""


@dataclass
class Request:
    prompt: str | list[int]  # text, or token ids
    adapter: str | None = None  # None = the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False  # text and an update every token; otherwise text once, when finished
    # continuations to score after the prompt, all in one prefill (branch_scoring.py; needs
    # max_tokens 0): Completion.branch_logprobs
    branches: list[list[int]] | None = None


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, if the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, if asked (the first None)
    branch_logprobs: list[list[float]] | None = None  # one per token of each branch, if the request had branches


def completion_of(seq: Sequence) -> Completion:
    return Completion(seq.request_id, seq.text, list(seq.output_ids), seq.finish_reason or "",
                      len(seq.prompt_ids), seq.error,
                      list(seq.logprobs) if seq.params.logprobs is not None else None, seq.prompt_logprobs,
                      seq.branch_logprobs)
