"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Every field is bounded here, at the boundary, so that no body can reach the engine with
a value it cannot handle: the engine trusts these types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT = 100_000
Name = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopStr = Annotated[str, Field(min_length=1, max_length=64)]
Stop = Union[StopStr, Annotated[list[StopStr], Field(max_length=4)], None]
MaxTokens = Annotated[int, Field(ge=1, le=4096)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
# OpenAI's logit_bias: token ids (as JSON object keys, so strings) -> a bias in [-100, 100]
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                           Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]], Field(max_length=1024)]


def not_supported(what: str):
    raise ValueError(f"{what} is not supported by this server")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage and no choices


class JSONSchemaFormat(_Body):
    name: Annotated[str, Field(max_length=64)] = "response"
    description: Annotated[str, Field(max_length=4096)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class _Sampling(_Body):
    max_tokens: MaxTokens | None = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1  # choices a prompt
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    min_tokens: Annotated[int, Field(ge=0, le=4096)] = 0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=16)] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # the answer is one of these texts (each encoded on its own; serve/guided.py) ...
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                             Field(min_length=1, max_length=256)] | None = None
    # ... or JSON valid under this schema, or a full match of this regex or grammar (serve/grammar.py)
    guided_json: Union[dict[str, Any], Annotated[str, Field(min_length=1, max_length=65536)]] | None = None
    guided_regex: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1, max_length=65536)] | None = None  # EBNF: root ::= ...
    response_format: ResponseFormat | None = None  # OpenAI's: text, json_object, json_schema
    # vLLM's: each prompt token's log-probability and rank, and this many alternatives (not with stream)
    prompt_logprobs: TopLogprobs | None = None
    # vLLM's: only the prompt's last k tokens (left truncation); -1: as many as the server takes
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_at_least_one(cls, v):
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be >= 1, or -1 for as many as the server takes")
        return v


class CompletionRequest(_Sampling):
    model: Name
    # text, texts, token ids, or lists of token ids (OpenAI's four forms)
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=16)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=16)]]
    # 0: the prompt only (with echo and logprobs: its log-probabilities, as scoring clients ask)
    max_tokens: Annotated[int, Field(ge=0, le=4096)] | None = 16
    logprobs: TopLogprobs | None = None  # each token's log-probability and this many alternatives
    echo: bool = False  # the prompt's text before the completion's (with logprobs: and its tokens' entries)
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    # accepted only empty (the schema says so; the validator's message says why)
    suffix: Annotated[str | None, Field(json_schema_extra={"maxLength": 0})] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return v if not v else not_supported("suffix (insertion)")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | None = ""


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]


class ChatCompletionRequest(_Sampling):
    model: Name
    messages: Messages
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None  # alternatives a token, with logprobs
    tools: Annotated[list[Any] | None, Field(json_schema_extra={"maxItems": 0})] = None
    functions: Annotated[list[Any] | None, Field(json_schema_extra={"maxItems": 0})] = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v):
        return v if not v else not_supported("tool and function calling")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format: one entry a generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token (nothing precedes it)
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's entry for a prompt token or an alternative to it."""

    logprob: float
    rank: int | None = None  # 1: the most likely token
    decoded_token: str


# one entry a prompt token (the first null: nothing precedes it), keyed by token id
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked: the templated prompt's tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tasktune"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None  # prompt + completion tokens (vLLM's field)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
AdapterPath = Annotated[str, Field(min_length=1, max_length=4096)]


class AdapterLoadRequest(_Body):
    name: AdapterName
    path: AdapterPath


class LoraLoadRequest(_Body):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: AdapterName
    lora_path: AdapterPath


class LoraUnloadRequest(_Body):
    """vLLM's /v1/unload_lora_adapter body (lora_int_id is accepted and not needed)."""

    lora_name: AdapterName
    lora_int_id: int | None = None


class AdapterOut(BaseModel):
    name: str
    rank: int
    scaling: float
    target_modules: list[str]
    base_model: str | None


class TaskPredictRequest(_Body):
    # the task's input fields by name, or (a task that reads one field) its value alone, as
    # in Hugging Face's inference API: a text, or a word list for tagging
    inputs: Union[Text, list[Text], Annotated[dict[Annotated[str, Field(max_length=64)], Union[Text, list[Text]]],
                                              Field(max_length=32)]]
    model: Name | None = None
    max_tokens: MaxTokens = 64  # causal runs
    top_k: Annotated[int, Field(ge=1, le=100)] = 5  # how many labels `top` lists
    # causal runs: a closed-set task answers with one of its labels, each scored whole after the
    # prompt as `tasktune eval` scores them, and a tagging task writes only its slot types and
    # spans of the input words (a grammar); false: free decoding, parsed
    guided: bool = True


class LabelScore(BaseModel):
    label: str
    score: float


class SlotSpan(BaseModel):
    slot: str
    value: str
    start: int  # first word
    end: int  # one past the last word


class TaskPredictResponse(BaseModel):
    """`prediction` is a label, or one BIO tag per word for tagging. `score`: an encoder
    run's label probability; a causal run's probability of its label among the labels
    (closed sets, each label scored whole), else of its generated answer (the product of its
    tokens'). `top`: the likeliest labels (encoder runs, and causal runs
    scoring their labels); `slots`: an encoder run's tagging spans."""

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


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages (rendered as /v1/chat/completions renders them)."""

    model: Name | None = None
    prompt: Text | None = None
    messages: Messages | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Body):
    model: Name | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str
