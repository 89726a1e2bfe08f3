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
- `max_completion_tokens` (or `max_tokens`) -> max_new_tokens; `temperature` defaults to 0 (greedy,
  PaliGemma's recommended decoding), not OpenAI's 1 (below 1e-5 is greedy too); `top_p` and `seed` are
  honoured; `n` must be 1. Refused with a 400 when set to anything but their neutral value: `stop`,
  `tools` / `tool_choice` and the legacy `functions` / `function_call`, `response_format` (other than
  text), `logprobs` / `top_logprobs`, `logit_bias`, `frequency_penalty` / `presence_penalty`, `audio`,
  `modalities` (other than ["text"]), `prediction`. Accepted and ignored: `user`, `metadata`, `store`,
  `service_tier`, `parallel_tool_calls`, `reasoning_effort`, `safety_identifier`, `prompt_cache_key`.
  Any other field is a 400 (unknown field).
- finish_reason is "length" when the token budget ran out, else "stop". usage counts image tokens
  as prompt tokens.
- `stream: true` sends Server-Sent Events (`chat.completion.chunk`, then `data: [DONE]`), one chunk per
  new piece of text, decoded on the continuous-batching engine with every other request; a client
  that disconnects frees its slot at the next step. `stream_options.include_usage` adds the usage chunk. An error after the stream started
  arrives as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .batcher import QueueFull, Stopped
from .schemas import ApiError, ChatRequest, Item, bad_request, clean_message

log = logging.getLogger("palikit.serve")


@dataclass
class ChatCall:
    prompt: str
    images: list[str]          # data URLs / base64, decoded by the app
    options: dict[str, Any]    # Options fields
    stream: bool
    include_usage: bool


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
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        "response_format is not supported: PaliGemma answers plain text; remove it."),
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
                    bool(req.stream_options and req.stream_options.include_usage))


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
          usage: dict[str, int] | None = None, empty_choices: bool = False) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if empty_choices else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------ streaming
async def stream(state, cid: str, image, call, opts, n_prompt: int):
    """SSE chunks of an OpenAI streaming chat completion: the request decodes on the engine with
    everything else, and each new piece of text (incremental detokenization) becomes a chunk."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)  # noqa: E731 - engine thread
    created = int(time.time())
    job = asyncio.ensure_future(state.run(opts, Item(image, call.prompt, None), on_text))
    sent = []
    try:
        yield chunk(cid, state.name, created, {"role": "assistant", "content": ""})
        while True:
            get = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({get, job}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                sent.append(get.result())
                yield chunk(cid, state.name, created, {"content": sent[-1]})
                continue
            get.cancel()
            while not pieces.empty():
                sent.append(pieces.get_nowait())
                yield chunk(cid, state.name, created, {"content": sent[-1]})
            break
        try:
            result = job.result()
        except Exception as e:  # noqa: BLE001
            err = e if isinstance(e, ApiError) else stream_error(e, state)
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        streamed = "".join(sent)
        if result.text != streamed and result.text.startswith(streamed):  # held-back tail (or beam search)
            yield chunk(cid, state.name, created, {"content": result.text[len(streamed):]})
        n = len(result.tokens)
        finish = "length" if n >= opts.max_new_tokens else "stop"
        yield chunk(cid, state.name, created, {}, finish)
        if call.include_usage:
            yield chunk(cid, state.name, created, {}, usage=usage(n_prompt, n), empty_choices=True)
        yield "data: [DONE]\n\n"
    finally:
        if not job.done():
            job.cancel()  # the client went away: the engine frees its slot


def stream_error(e: BaseException, state) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(503, "overloaded", "the server is busy (request queue full); retry shortly.")
    if isinstance(e, Stopped):
        return ApiError(503, "unavailable", "the server is shutting down.")
    if isinstance(e, asyncio.TimeoutError):
        return ApiError(504, "timeout", f"the request did not finish within {state.settings.request_timeout_s:g} s.")
    if isinstance(e, ValueError):
        return ApiError(400, "invalid_request", clean_message(str(e)))
    log.error("streaming generation failed: %r", e)
    return ApiError(500, "internal_error", "internal server error during generation.")
