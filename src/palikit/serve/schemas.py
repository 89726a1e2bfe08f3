"""Request bodies of the HTTP server. JSON bodies are validated strictly ("temperature": "0.5" is
refused); multipart form fields are strings, so they are validated leniently ("0.5" is a number
there). `gen_options` is the HTTP edge's one conversion of the request's options into
`PredictOptions` (the server's limits and defaults applied). Settings: `settings.py`; errors: `errors.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..tasks.options import PredictOptions
from .errors import bad_request, validation_message
from .settings import ServerSettings


# ------------------------------------------------------------------------------ requests
class Options(BaseModel):
    """Generation options shared by every endpoint (all optional)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (server default 64).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (deterministic); > 0 samples. Values "
                               "below 1e-5 are treated as 0 (greedy), as in vLLM.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens (with temperature > 0); "
                              "k at or above the vocabulary size means no top-k cut.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling (with temperature > 0). Values "
                                "below 1e-5 keep only the most likely token: greedy.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_beams: int = Field(1, ge=1, description="Beam search width (greedy only).")
    coord_denominator: int = Field(1024, description="Box decoding: 1024 (official demo) or 1023 (big_vision RefCOCO).")
    dedupe_iou: float | None = Field(None, ge=0.0, le=1.0, description="Drop duplicate boxes above this IoU.")
    adapter: str | None = Field(None, max_length=128, description="A loaded LoRA adapter's name (GET /v1/models); "
                                "none = the base model.")
    constrained: bool | Literal["detect", "segment"] | None = Field(
        None, description="detect/segment output kept in its format (boxes, masks, requested labels only): on by "
        "default for detect/segment prompts; false = the raw model; 'detect'/'segment' = that format for any wording.")


class ImageField(BaseModel):
    image: str = Field(..., description="The image as base64 or a data URL (data:image/png;base64,...). "
                                       "URLs and file paths are not accepted; multipart uploads are.")


_REQUEST_MODELS: dict[str, type[BaseModel]] = {}
CHOICES_HELP = ("A closed set of answers to score instead of generating (at most 64): a JSON list, or in a form one "
                "string 'yes ; no'. The answer is the most probable; `choices` lists each one's text, logprob "
                "(log P(choice + EOS | image, prompt)) and probability (softmax over the set).")


def request_model(task: str) -> type[BaseModel]:
    """The request body of `/v1/<task>`, built from the task table (`tasks.registry`): the generation
    `Options`, the `image`, one field per task argument (labels: a list or one string) and `lang`."""
    from ..tasks.registry import get_task

    t = get_task(task)
    cached = _REQUEST_MODELS.get(task)
    if cached is not None and cached.__palikit_task__ is t:
        return cached
    spec: dict[str, Any] = {}
    for a in t.args:
        typ: Any = (list[str] | str) if a.kind == "labels" else str
        if not a.required:
            typ = typ | None
        spec[a.name] = (typ, Field(... if a.required else None, description=a.help or None))
    if t.lang:
        spec["lang"] = (str, "en")
    if t.choices:
        spec["choices"] = (list[str] | str | None, Field(None, description=CHOICES_HELP))
    model = create_model(f"{t.name.capitalize()}Request", __base__=(Options, ImageField), **spec)
    model.__palikit_task__ = t
    _REQUEST_MODELS[task] = model
    return model


GREEDY_BELOW = 1e-5  # temperature or top_p below this: greedy decoding


def gen_options(opts: Options, settings: ServerSettings) -> PredictOptions:
    """The HTTP edge's one conversion: apply server limits and defaults to the request's options and
    return the library's `PredictOptions`; raise ApiError on what the engine would refuse."""
    mnt = opts.max_new_tokens if opts.max_new_tokens is not None else settings.default_max_new_tokens
    if mnt > settings.max_new_tokens_limit:
        raise bad_request(f"max_new_tokens is {mnt}; this server allows at most {settings.max_new_tokens_limit}.",
                          "max_new_tokens")
    if opts.num_beams > settings.max_num_beams:
        raise bad_request(f"num_beams is {opts.num_beams}; this server allows at most {settings.max_num_beams}.",
                          "num_beams")
    from ..tasks.boxes import DENOMINATORS

    if opts.coord_denominator not in DENOMINATORS:
        raise bad_request("coord_denominator must be 1024 (official demo) or 1023 (big_vision RefCOCO).",
                          "coord_denominator")
    if opts.num_beams > 1 and opts.temperature > 0:
        raise bad_request("beam search is deterministic: use temperature=0 with num_beams > 1.", "num_beams")
    temperature, top_k, top_p = float(opts.temperature), opts.top_k, opts.top_p
    if temperature < GREEDY_BELOW:  # vLLM's convention: a vanishing temperature is greedy
        temperature = 0.0
    elif top_p is not None and top_p < GREEDY_BELOW:  # keeps only the most likely token: greedy too
        temperature, top_k, top_p = 0.0, None, None
    return PredictOptions(max_new_tokens=mnt, temperature=temperature, top_k=top_k, top_p=top_p, seed=opts.seed,
                          num_beams=opts.num_beams, coord_denominator=opts.coord_denominator,
                          dedupe_iou=opts.dedupe_iou, adapter=opts.adapter,
                          constrained=opts.constrained)


# ------------------------------------------------------------------------------ chat (OpenAI)
class ChatImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url", "input_text", "input_image"]
    text: str | None = None
    image_url: ChatImageUrl | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat.completions body that maps onto PaliGemma. Every OpenAI field is
    named here: the ones PaliGemma cannot honour (tools, functions, logprobs, ...)
    are refused with a 400 saying so when set to anything but their neutral value; bookkeeping fields
    (user, metadata, store, service_tier, ...) are accepted and ignored; unknown fields are a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 0 (greedy), unlike OpenAI's 1; "
                                      "below 1e-5 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="With temperature > 0; below 1e-5 is greedy.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # refused unless neutral (see openai_compat.parse_chat)
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    # structured outputs (serve/structured.py): OpenAI's response_format above, and vLLM's extra fields
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: Any = None
    # accepted and ignored
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    reasoning_effort: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None


def parse_model(model: type[BaseModel], data: Any, *, strict: bool) -> Any:
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object.")
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise bad_request(msg, param) from None

