"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Every field is bounded here, at the boundary, so that no body can reach the engine with
a value it cannot handle: the engine trusts these types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 100_000
Name = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopStr = Annotated[str, Field(min_length=1, max_length=64)]
Stop = Union[StopStr, Annotated[list[StopStr], Field(max_length=4)], None]
MaxTokens = Annotated[int, Field(ge=1, le=4096)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    max_tokens: MaxTokens | None = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1


class CompletionRequest(_Sampling):
    model: Name
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=16)]]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | None = ""


class ChatCompletionRequest(_Sampling):
    model: Name
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_completion_tokens: MaxTokens | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tasktune"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoadRequest(_Body):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
    path: Annotated[str, Field(min_length=1, max_length=4096)]


class AdapterOut(BaseModel):
    name: str
    rank: int
    scaling: float
    target_modules: list[str]
    base_model: str | None


class TaskPredictRequest(_Body):
    inputs: Annotated[dict[Annotated[str, Field(max_length=64)], Union[Text, list[Text]]], Field(max_length=32)]
    model: Name | None = None
    max_tokens: MaxTokens = 64  # causal runs
    top_k: Annotated[int, Field(ge=1, le=100)] = 5  # encoder runs: how many labels `top` lists


class LabelScore(BaseModel):
    label: str
    score: float


class SlotSpan(BaseModel):
    slot: str
    value: str
    start: int  # first word
    end: int  # one past the last word


class TaskPredictResponse(BaseModel):
    """`prediction` is a label, or one BIO tag per word for tagging. Encoder runs also
    give the label's probability and the top labels (classification) or the slots (tagging)."""

    task: str
    model: str
    prediction: Any
    valid: bool
    text: str
    score: float | None = None
    top: list[LabelScore] | None = None
    slots: list[SlotSpan] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail
