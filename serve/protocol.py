"""The OpenAI request bodies the server takes, as pydantic models, and what each field means here.

Bodies are validated strictly (no string-to-number coercion; booleans are not numbers) and every field must be
known: an unknown field is a 400 naming it, never ignored. OpenAI fields with no meaning for a diffusion sampler are
accepted only at the value that means "off" (`n` 1, `top_p` 1, penalties 0, `logprobs` off, no `tools`, text
`response_format`, ...); any other value is a 400 that says why (`refusals`). `temperature` is mapped: it scales the
checkpoint's temperature schedule (t_min and t_max). The diffusion parameters come as extra fields (`Diffusion`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4  # OpenAI's limit on stop strings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool | None = None  # a last chunk with the usage and no choices
    include_drafts: bool | None = None  # extension: a `draft` event every denoising step (README "Serving")


class Diffusion(Strict):
    """The sampler's parameters (runtime/sampler.py SamplingConfig), each defaulting to the checkpoint's
    generation_config.json; the first canvas; pinned and constrained positions; whether to return token ids."""

    max_denoising_steps: int | None = Field(None, ge=1)
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = Field(None, ge=0)
    warm_start: list[int] | None = None  # the first canvas's token ids, instead of uniform noise
    pinned: list[int] | None = None  # a token id per generated position, -1 where free (runtime/canvas.py)
    allowed: dict[int, list[int]] | None = None  # generated position -> the token ids it may hold
    return_token_ids: bool | None = None  # choices carry `token_ids`, the response `prompt_token_ids`


class Common(Diffusion):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    user: str | None = None  # a label for the caller's own records; it changes nothing here
    # OpenAI fields accepted only where they mean "off" (`refusals`), or mapped (temperature).
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    thinking: bool | None = None  # extension: the chat format's thinking switch
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


ONE_CHOICE = "one choice per request: send several requests instead (they share the engine's decoder passes)"
NO_LOGPROBS = "log probabilities are not returned: the sampler keeps each position's entropy, not its token log-probs"
PENALTY = "every position of a canvas is sampled at once, so there is no earlier output within it to penalize"

# field -> (the values that mean "off", why any other is refused)
REFUSED = {
    "n": ((None, 1), ONE_CHOICE),
    "best_of": ((None, 1), ONE_CHOICE),
    "top_p": ((None, 1, 1.0), "the entropy-bound sampler draws from each position's full distribution (top_p 1)"),
    "presence_penalty": ((None, 0, 0.0), PENALTY),
    "frequency_penalty": ((None, 0, 0.0), PENALTY),
    "logit_bias": ((None, {}), "the sampler takes the model's logits unchanged"),
    "top_logprobs": ((None, 0), NO_LOGPROBS),
    "tools": ((None, []), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "parallel_tool_calls": ((None, False, True), "tool calling is not supported"),
    "echo": ((None, False), "the prompt is not echoed: prepend it yourself"),
    "suffix": ((None, ""), "insertion (a suffix after the completion) is not supported"),
}


def refusals(body: Common) -> tuple[str, str] | None:
    """(field, reason) for the first field set to a value the server cannot honour, or None."""
    for name, (off, why) in REFUSED.items():
        value = getattr(body, name, None)
        if not any(value == o and type(value) is type(o) for o in off):
            return name, f"{name}={value!r} is not supported: {why}"
    if (logprobs := getattr(body, "logprobs", None)) not in (None, False, 0):
        return "logprobs", f"logprobs={logprobs!r} is not supported: {NO_LOGPROBS}"
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        return "response_format", "only response_format {'type': 'text'} is supported: output is not constrained"
    return None
