"""Request and response bodies of the OpenAI-compatible API (the subset steerlm serves), as pydantic models.

Two extensions on a chat-completions request:
- `attributes`: {"verbosity": 1, ...}: the AC-SFT attribute values (unset ones: the model card's defaults);
- `steering`: activation steering, {"attribute": "verbosity", "coefficient": 2, "layer": 15, "positions":
  "all"} with the server's attribute vectors, or an inline spec {"positions": ..., "layers": {"15": [{"type":
  "add", "vector": [floats], "scale": 4}]}}.
Fields OpenAI clients may send that change nothing here (`user`, `metadata`, ...) are accepted and
ignored; ones that would change the answer and are not implemented are refused (`UNSUPPORTED`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI fields that would change the output, with the value that means "off"
UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None,
               "logit_bias": None, "tools": None, "functions": None, "response_format": None}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    attributes: Optional[dict[str, Optional[float]]] = None
    steering: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server does not implement, as an error message."""
        for name, off in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name, off)
            if value not in (off, None):
                return f"{name} is not supported by this server"
        return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    attributes: dict[str, float]  # the values the answer was conditioned on (defaults filled in)


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steerlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}
