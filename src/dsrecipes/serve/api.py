"""The OpenAI API of the server: request schemas, the prompt shapes, and error bodies.

    req = CompletionRequest(prompt="Hello", max_tokens=8)      # strict pydantic models (FastAPI validates bodies)
    raise APIError(400, "...", "max_tokens", "invalid_value")  # -> {"error": {"message", "type", "param", "code"}}

Used by dsrecipes.serve.app (the routes), dsrecipes.serve.batcher (429/503 errors) and dsrecipes.serve.loadgen.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


# ----------------------------------------------------------------------------- schemas (OpenAI API)
class _Strict(BaseModel):
    # strict: "8" is not an int and 8.5 is not an int; unknown fields are ignored like OpenAI's SDKs expect
    model_config = ConfigDict(strict=True, extra="ignore")


TokenIds = list[Annotated[int, Field(ge=0)]]


Stop = Optional[Union[str, Annotated[list[str], Field(max_length=4)]]]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]


class _Sampling(_Strict):
    """Parameters completions and chat share. OpenAI parameters this server cannot honour are accepted only at
    their neutral value (refused() names the first one that is not), so nothing is silently ignored."""

    model: Optional[str] = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: Stop = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None

    def refused(self) -> Optional[str]:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        extra = set(self.stream_options or {}) - {"include_usage"}
        return "stream_options" if extra else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None  # 0 only with echo (scoring the prompt)
    n: Annotated[int, Field(ge=1, le=1)] = 1
    best_of: Optional[Annotated[int, Field(ge=1)]] = None
    echo: bool = False
    logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    suffix: Optional[str] = None

    def refused(self) -> Optional[str]:
        if self.best_of not in (None, 1):
            return "best_of"
        return "suffix" if self.suffix else super().refused()


class TextPart(_Strict):
    type: Annotated[str, Field(pattern="^text$")]
    text: str


class ChatMessage(_Strict):
    role: Annotated[str, Field(pattern="^(system|developer|user|assistant)$")]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None

    def refused(self) -> Optional[str]:
        for name in ("tools", "tool_choice"):
            if getattr(self, name):
                return name
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs"
        return super().refused()


class EmbeddingRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Annotated[str, Field(pattern="^(float|base64)$")] = "float"
    dimensions: Optional[Annotated[int, Field(ge=1)]] = None
    user: Optional[str] = None


def as_prompt_list(value) -> list:
    """OpenAI's four prompt/input shapes -> a list of str or token-id lists."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


class APIError(Exception):
    """-> HTTP status + OpenAI error body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(exc) -> APIError:
    """pydantic/FastAPI validation errors -> one 400 naming the first bad field."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.", None, "invalid_json")
    param = loc[0] if loc else None
    return APIError(
        400,
        f"Invalid value for '{'.'.join(loc) or 'body'}': {first.get('msg', 'invalid request')}",
        param,
        "invalid_value",
    )
