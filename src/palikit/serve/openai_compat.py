"""OpenAI-compatible `/v1/chat/completions`: how chat messages map onto PaliGemma's prefix format.

PaliGemma has no chat template: it answers ONE prompt about one image (or several frames). The
mapping, documented for users of OpenAI clients:

- The prompt is the text of the LAST user message (its text parts joined by a space, whitespace
  collapsed so no newline ends the prefix early). Write PaliGemma task prompts there:
  `caption en`, `ocr`, `answer en what is this`, `detect cat ; dog`, `segment cat`.
- The image is the `image_url` part(s) of the last user message that has any (so a follow-up
  text-only question reuses the earlier image). Several images in one message are frames of one
  example. Images are data URLs (`data:image/png;base64,...`) or bare base64: the server never
  fetches URLs and never reads files.
- system / developer / assistant / tool messages are ignored; earlier turns are not context.
- `model` is one of the served names (`GET /v1/models`: `--name`) or absent; another is a 404
  `model_not_found` listing the served names, as OpenAI answers.
- `max_completion_tokens` (or `max_tokens`) -> max_new_tokens; `temperature` defaults to 0 (greedy,
  PaliGemma's recommended decoding), not OpenAI's 1 (below 1e-5 is greedy too); `top_p` and `seed` are
  honoured; `n` must be 1. Structured outputs: `response_format` (json_schema, json_object) and vLLM's
  `guided_json` / `guided_regex` / `guided_choice` / `structured_outputs` (`structured.py`). Refused with
  a 400 when set to anything but their neutral value: `stop`,
  `tools` / `tool_choice` and the legacy `functions` / `function_call`, `logprobs` / `top_logprobs`, `logit_bias`, `frequency_penalty` / `presence_penalty`, `audio`,
  `modalities` (other than ["text"]), `prediction`. Accepted and ignored: `user`, `metadata`, `store`,
  `service_tier`, `parallel_tool_calls`, `reasoning_effort`, `safety_identifier`, `prompt_cache_key`.
  Any other field is a 400 (unknown field).
- finish_reason is "length" when the token budget ran out, else "stop". usage counts image tokens
  as prompt tokens.
- A prompt PaliGemma is unlikely to answer as meant ("Detect circle", "find the dogs", a class name
  the tokenizer cannot write: `tasks.prompts.suggest_prompt`) gets the hint in a `palikit` field,
  `{"palikit": {"hint": "use \"detect circle\": task keywords are lower case"}}` (on the response; on
  the last chunk of a stream), and one log line. OpenAI clients ignore the field.
- `stream: true` sends Server-Sent Events (`chat.completion.chunk`, then `data: [DONE]`), one chunk per
  new piece of text, decoded on the continuous-batching engine with every other request; a client
  that disconnects frees its slot at the next step. `stream_options.include_usage` adds the usage
  chunk. A refusal (queue full, shutting down) comes before the stream starts, as the same HTTP error
  as on every route (503 + Retry-After); an error after it started arrives as one `data: {"error": ...}`
  event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from .errors import ApiError, bad_request
from .front import Item
from .images import image_bytes_from_string
from .parsing import read_fields
from .adapters import chat_adapter
from .schemas import ChatRequest, Options, gen_options, parse_model
from .structured import chat_constraint, chat_spec

log = logging.getLogger("palikit.serve")


@dataclass
class ChatCall:
    prompt: str
    images: list[str]          # data URLs / base64, decoded by the app
    options: dict[str, Any]    # Options fields
    stream: bool
    include_usage: bool
    structured: Any = None  # (StructuredSpec, the field that asked) or None (structured.py)


def _text_and_images(content) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content:
        if part.type in ("text", "input_text"):
            texts.append(part.text or "")
        else:
            url = part.image_url.url if part.image_url is not None and not isinstance(part.image_url, str) else part.image_url
            if not url:
                raise bad_request("an image_url part has no url; send {'type': 'image_url', 'image_url': "
                                  "{'url': 'data:image/png;base64,...'}}.", "messages")
            images.append(url)
    return " ".join(texts), images


_NO_TOOLS = "PaliGemma does not call functions; remove it"
_REFUSED = {  # field -> (is it set to something this server would have to honour?, why not)
    "tools": (bool, f"tools are not supported: {_NO_TOOLS}."),
    "functions": (bool, f"functions (legacy tools) are not supported: {_NO_TOOLS}."),
    "tool_choice": (lambda v: v not in (None, "none"), f"tool_choice is not supported: {_NO_TOOLS}."),
    "function_call": (lambda v: v not in (None, "none"), f"function_call is not supported: {_NO_TOOLS}."),
    "logprobs": (bool, "logprobs are not returned by this endpoint; use /v1/predict (token_logprobs)."),
    "top_logprobs": (lambda v: v is not None, "top_logprobs are not supported; use /v1/predict (token_logprobs)."),
    "logit_bias": (bool, "logit_bias is not supported; remove it."),
    "frequency_penalty": (bool, "frequency_penalty is not supported (only 0); remove it."),
    "presence_penalty": (bool, "presence_penalty is not supported (only 0); remove it."),
    "audio": (lambda v: v is not None, "audio output is not supported: PaliGemma answers text."),
    "modalities": (lambda v: v is not None and list(v) != ["text"], "only the text modality is supported."),
    "prediction": (lambda v: v is not None, "prediction (predicted outputs) is not supported; remove it."),
}


def parse_chat(req: ChatRequest) -> ChatCall:
    if req.n != 1:
        raise bad_request("n must be 1: this server returns one completion per request.", "n")
    for name, (is_set, why) in _REFUSED.items():
        if is_set(getattr(req, name)):
            raise bad_request(why, name)
    if req.stop:
        raise bad_request("stop sequences are not supported: PaliGemma stops at its end-of-sequence token; "
                          "limit the length with max_tokens.", "stop")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise bad_request("no user message: put the prompt (e.g. 'caption en') and the image in a user message.",
                          "messages")
    text, _ = _text_and_images(users[-1].content)
    images: list[str] = []
    for m in reversed(users):
        _, images = _text_and_images(m.content)
        if images:
            break
    prompt = " ".join(text.split())
    if not prompt:
        raise bad_request("the last user message has no text: it is the PaliGemma prompt, e.g. 'caption en', "
                          "'answer en what is this', 'detect cat'.", "messages")
    if not images:
        raise bad_request("no image: PaliGemma answers about an image; add {'type': 'image_url', 'image_url': "
                          "{'url': 'data:image/png;base64,...'}} to the user message.", "messages")
    opts: dict[str, Any] = {"temperature": req.temperature if req.temperature is not None else 0.0}
    mnt = req.max_completion_tokens or req.max_tokens
    if mnt is not None:
        opts["max_new_tokens"] = mnt
    if req.top_p is not None and opts["temperature"] > 0:
        opts["top_p"] = req.top_p
    if req.seed is not None:
        opts["seed"] = req.seed
    return ChatCall(prompt, images, opts, req.stream,
                    bool(req.stream_options and req.stream_options.include_usage), chat_spec(req))


def hint_field(hint: str | None, prompt: str) -> dict[str, Any]:
    """`{"palikit": {"hint": ...}}` for a prompt with a hint (`Result.hint`), logged once; else {}."""
    if not hint:
        return {}
    log.info("prompt hint for chat prompt %r: %s", prompt[:80], hint)
    return {"palikit": {"hint": hint}}


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          usage: dict[str, int] | None = None, empty_choices: bool = False, extra: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if empty_choices else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    body.update(extra or {})
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------ the endpoint
async def chat_completions(request: Request):
    """`POST /v1/chat/completions`: the chat mapped onto one prompt and its image(s) (module docstring),
    then the same path as a task endpoint (`app.py`, life of a request). A streaming chat is queued on
    the engine BEFORE the response starts, so a refusal (queue full, shutting down) is a plain HTTP
    error with its headers (Retry-After), like every other route's."""
    state = request.app.state.palikit
    settings = state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the chat request as application/json.")
    fields, _, _ = await read_fields(request, settings)
    req = parse_model(ChatRequest, fields, strict=True)
    state.check_model(req.model)
    call = parse_chat(req)
    if len(call.images) > settings.max_images_per_request:
        raise bad_request(f"{len(call.images)} images; at most {settings.max_images_per_request} per request.",
                          "messages")
    adapter = chat_adapter(state, req.model)
    served = adapter or state.name  # the answer names the model that wrote it: the adapter, else the base
    opts = gen_options(Options(**call.options, adapter=adapter), settings)
    ids = state.prompt_ids(call.prompt, "messages")
    constraint = await chat_constraint(state.pg, call.structured)
    datas = [image_bytes_from_string(u, settings, "messages") for u in call.images]
    call.images, fields = [], None
    frames = []
    while datas:
        frames.append(await state.decode(datas.pop(0), "messages"))
    item = Item(frames[0] if len(frames) == 1 else frames, call.prompt, ids, None, constraint=constraint)
    n_prompt = len(ids) + _image_tokens(state.pg) * len(frames)
    cid = new_id()
    if not call.stream:
        result = await state.run(opts, item, request=request)
        n = len(result.tokens)
        return {**completion(cid, served, result.text, "length" if n >= opts.max_new_tokens else "stop",
                             usage(n_prompt, n)),
                **hint_field(result.hint, call.prompt)}
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    pending = await state.front.submit(item, opts, lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
    # background: cancel it even when the client left before the stream started (then `stream` never runs)
    return StreamingResponse(stream(state, cid, pending, pieces, call, opts, n_prompt, served), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(pending.cancel))


def _image_tokens(pg) -> int:
    try:
        return int(pg.model.config.vision.num_image_tokens)
    except Exception:  # noqa: BLE001
        return 0


# ------------------------------------------------------------------------------ streaming
async def stream(state, cid: str, pending, pieces: asyncio.Queue, call, opts, n_prompt: int, model: str):
    """SSE chunks of an OpenAI streaming chat completion for a request already queued on the engine:
    each new piece of text (incremental detokenization, put on `pieces` from the engine thread)
    becomes a chunk; an error after the stream started is one `data: {"error": ...}` event
    (`errors.api_error`, as on every route). `model`: the served name every chunk carries."""
    created = int(time.time())
    job = asyncio.ensure_future(state.front.result(pending, state.settings.request_timeout_s))
    sent, get = [], None
    try:
        yield chunk(cid, model, created, {"role": "assistant", "content": ""})
        while True:
            get = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({get, job}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                sent.append(get.result())
                yield chunk(cid, model, created, {"content": sent[-1]})
                continue
            get.cancel()
            while not pieces.empty():
                sent.append(pieces.get_nowait())
                yield chunk(cid, model, created, {"content": sent[-1]})
            break
        try:
            result = job.result()
        except Exception as e:  # noqa: BLE001
            yield f"data: {json.dumps(state.error(e).body())}\n\n"
            return
        streamed = "".join(sent)
        if result.text != streamed and result.text.startswith(streamed):  # held-back tail (or beam search)
            yield chunk(cid, model, created, {"content": result.text[len(streamed):]})
        n = len(result.tokens)
        finish = "length" if n >= opts.max_new_tokens else "stop"
        yield chunk(cid, model, created, {}, finish, extra=hint_field(result.hint, call.prompt))
        if call.include_usage:
            yield chunk(cid, model, created, {}, usage=usage(n_prompt, n), empty_choices=True)
        yield "data: [DONE]\n\n"
    finally:
        for task in (get, job):  # the client went away: the engine frees its slot; no task left pending
            if task is not None and not task.done():
                task.cancel()
