"""The request bodies the server accepts, as OpenAI's API documents them (the fields a small chat model
can honour); pydantic checks types and ranges, and the app turns its complaints into 400s.

Fields OpenAI has and we do not use (logit_bias, tools, ...) are ignored, as vLLM does: clients send them by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

MAX_N = 16  # choices per request; each is a row of the running batch
MAX_STOPS = 4  # OpenAI's limit on stop strings


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and text completions share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    chat_template_kwargs: dict[str, object] = Field(default_factory=dict)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)

    def token_limit(self) -> int | None:
        return self.max_tokens


__all__ = ["ChatRequest", "CompletionRequest", "MAX_N", "Message"]
