"""Request bodies, server settings and the one error shape of the HTTP server.

Every client error is `{"error": {"type", "message"[, "param"]}}` with a 4xx status; messages say
what to change and never echo internals (no tracebacks, paths or huge inputs). JSON bodies are
validated strictly ("temperature": "0.5" is refused); multipart form fields are strings, so they
are validated leniently ("0.5" is a number there).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..tasks.options import PredictOptions


# ------------------------------------------------------------------------------ settings
@dataclass
class ServerSettings:
    """Everything `create_app` needs besides the model; `palikit serve` flags map one-to-one."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()           # Bearer keys; empty = no auth (fine on loopback only)
    max_batch_size: int = 16                 # engine slots: requests decoding together (continuous batching)
    max_queue: int = 256                     # requests waiting for a slot beyond which new ones get 503
    request_timeout_s: float = 60.0          # queue wait + generation; past it: 504
    max_upload_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000       # width * height read from the header, before decoding
    max_aspect_ratio: float = 100.0          # longer side / shorter side, from the header
    decode_budget_pixels: int = 64_000_000   # decoded pixels in flight, all requests together (~190 MB RGB)
    decode_wait_s: float = 1.0               # wait for that budget at most this long, then 429 + Retry-After
    max_json_depth: int = 32                 # nesting of a JSON body (deeper: 400)
    max_labels: int = 64                     # labels per request, every endpoint
    allowed_hosts: tuple[str, ...] | None = None  # Host header names served (None: any; see default_allowed_hosts)
    header_timeout_s: float = 10.0           # a connection must send complete request headers within this
    keep_alive_s: int = 5                    # idle keep-alive connections are closed after this
    max_images_per_request: int = 8          # frames of one example (chat messages with several images)
    max_prompt_chars: int = 2000
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 64
    max_num_beams: int = 4
    warmup: bool = True                      # one tiny prediction before /readyz says ready
    cors_origins: tuple[str, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        # base64 is 4/3 larger; room for several frames in one chat request and the JSON around them
        return (self.max_upload_bytes * 4 // 3 + 64 * 1024) * max(1, min(self.max_images_per_request, 4))

    def body_limit(self, path: str) -> int:
        """Bytes a request body to `path` may have (applied while reading)."""
        if path == "/v1/chat/completions":
            return self.max_body_bytes
        if path.startswith("/v1/"):
            return self.max_upload_bytes * 4 // 3 + 64 * 1024  # one image as base64 plus the fields
        return 64 * 1024

    def host_allowlist(self) -> tuple[str, ...] | None:
        """Names the Host header may carry (lower case, no port); None = any."""
        if self.allowed_hosts is None:
            return None
        names = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        return None if "*" in names else names

    @staticmethod
    def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
        """What `palikit serve` allows without --allowed-hosts: the loopback names on a loopback bind (a
        web page's DNS-rebinding request carries its own name), any name otherwise (use API keys)."""
        return ("localhost", "127.0.0.1", "::1") if is_loopback(host) else None

    @staticmethod
    def keys_from_env(value: str | None = None) -> tuple[str, ...]:
        raw = os.environ.get("PALIKIT_API_KEYS", "") if value is None else value
        return tuple(k.strip() for k in raw.split(",") if k.strip())


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """A client-facing error: HTTP status, machine-readable type, human message."""

    def __init__(self, status: int, type: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def bad_request(message: str, param: str | None = None, type: str = "invalid_request") -> ApiError:
    return ApiError(400, type, message, param=param)


def clean_message(msg: str) -> str:
    """Library messages are user-facing, but never let a path or a huge value through."""
    msg = re.sub(r"(/[\w.@+-]+){2,}", "<path>", msg)
    return msg[:500]


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One readable line per problem ("temperature: Input should be a valid number"), never the input."""
    parts, first = [], None
    for err in e.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see /docs for the accepted fields)"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), first


# ------------------------------------------------------------------------------ requests
class Options(BaseModel):
    """Generation options shared by every endpoint (all optional)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (server default 64).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (deterministic); > 0 samples. Values "
                               "below 1e-5 are treated as 0 (greedy), as in vLLM.")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling (with temperature > 0). Values "
                                "below 1e-5 keep only the most likely token: greedy.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_beams: int = Field(1, ge=1, description="Beam search width (greedy only).")
    coord_denominator: int = Field(1024, description="Box decoding: 1024 (official demo) or 1023 (big_vision RefCOCO).")
    dedupe_iou: float | None = Field(None, ge=0.0, le=1.0, description="Drop duplicate boxes above this IoU.")


class ImageField(BaseModel):
    image: str = Field(..., description="The image as base64 or a data URL (data:image/png;base64,...). "
                                       "URLs and file paths are not accepted; multipart uploads are.")


_REQUEST_MODELS: dict[str, type[BaseModel]] = {}


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
    model = create_model(f"{t.name.capitalize()}Request", __base__=(Options, ImageField), **spec)
    model.__palikit_task__ = t
    _REQUEST_MODELS[task] = model
    return model


OPTION_FIELDS = tuple(Options.model_fields)
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
                          dedupe_iou=opts.dedupe_iou)


GenOptions = PredictOptions  # the name the server used before PredictOptions was the one options type


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
    named here: the ones PaliGemma cannot honour (tools, functions, logprobs, response_format, ...)
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


@dataclass
class Item:
    """One generation request after parsing: what the engine front runs."""

    image: Any  # decoded PIL image, or a list of them (frames)
    prompt: str
    labels: list[str] | None
