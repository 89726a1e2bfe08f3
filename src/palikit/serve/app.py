"""The FastAPI app: `create_app(pg, settings)` -> task endpoints, OpenAI-compatible chat, health,
metrics and the browser playground, in front of one `PaliGemma` and its continuous-batching engine.

Images come only as bytes: a multipart upload, base64 or a data URL. The server never fetches a
URL and never opens a path a client names. Every limit (body bytes, image bytes, image pixels read
from the header before decoding, prompt length, max_new_tokens) answers a 4xx JSON error
`{"error": {"type", "message"}}`; unexpected failures answer 500 with a request id and no details
(the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_compat
from .batcher import EngineFront, QueueFull, Stopped
from .images import decode_image, image_bytes_from_string
from .metrics import Metrics
from .schemas import (TASK_REQUESTS, ApiError, ChatRequest, GenOptions, Options, ServerSettings, bad_request,
                      clean_message, gen_options, parse_model)

log = logging.getLogger("palikit.serve")
STATIC = Path(__file__).resolve().parent / "static"
TASKS = ("predict", "caption", "describe", "ocr", "answer", "detect", "segment")
OPEN_PATHS = ("/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
              "/favicon.ico")
ENDPOINTS = {f"/v1/{t}" for t in TASKS} | {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics",
                                           "/", "/docs", "/openapi.json"}
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'")


@dataclass
class Item:
    """One request for the model thread."""

    image: Any  # decoded PIL image, or a list of them (frames)
    prompt: str
    labels: list[str] | None


# ------------------------------------------------------------------------------ the app
class State:
    def __init__(self, pg, settings: ServerSettings):
        self.pg = pg
        self.settings = settings
        self.metrics = Metrics()
        self.ready = False
        self.batcher = EngineFront(pg, max_slots=settings.max_batch_size, max_queue=settings.max_queue,
                                   on_done=self._done)
        self.name = getattr(pg, "name", "paligemma")
        from ..api import MAX_PROMPT_TOKENS

        self.max_prompt_tokens = MAX_PROMPT_TOKENS
        # decoding a large image takes ~3 bytes per pixel: bound how many decode at once
        self.decode_limiter = anyio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))

    async def decode(self, data: bytes, param: str = "image"):
        return await anyio.to_thread.run_sync(decode_image, data, self.settings, param, limiter=self.decode_limiter)

    def _done(self, result, seconds: float) -> None:
        self.metrics.observe_generation(len(result.tokens), seconds)

    def prompt_tokens(self, prompt: str, param: str = "prompt") -> int:
        s = self.settings
        if len(prompt) > s.max_prompt_chars:
            raise bad_request(f"prompt is {len(prompt)} characters; this server accepts at most {s.max_prompt_chars}.",
                              param)
        if not prompt.strip():
            raise bad_request("prompt is empty: e.g. 'caption en', 'ocr', 'answer en what is this', 'detect cat'.",
                              param)
        n = len(self.pg.tokenizer.encode_prompt(prompt).ids)
        if n > self.max_prompt_tokens:
            raise bad_request(f"prompt is {n} tokens; the limit is {self.max_prompt_tokens}.", param)
        return n

    async def run(self, opts: GenOptions, item: Item, on_text=None, timeout_s: float | None = None) -> Any:
        try:
            return await self.batcher.run(item.image, item.prompt, item.labels, opts.as_kwargs(),
                                          timeout_s or self.settings.request_timeout_s, on_text)
        except QueueFull as e:
            raise ApiError(503, "overloaded", "the server is busy (request queue full); retry shortly.",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except Stopped:
            raise ApiError(503, "unavailable", "the server is shutting down.", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the request did not finish within {self.settings.request_timeout_s:g} s; "
                           "retry later or ask for fewer tokens.") from None
        except ApiError:
            raise
        except ValueError as e:  # the library's user-facing errors (bad option, prompt too long, bad image)
            kind = "invalid_image" if type(e).__name__ == "ImageError" else "invalid_request"
            raise ApiError(400, kind, clean_message(str(e))) from None

    def check_key(self, header: str | None) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        if not header or not header.lower().startswith("bearer "):
            return False
        token = header[7:].strip().encode()
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(token, k.encode())
        return ok


def error_response(e: ApiError) -> JSONResponse:
    headers = dict(e.headers)
    if e.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class ServerMiddleware:
    """Pure ASGI: request ids, API-key check, body-size cap, metrics, security headers."""

    def __init__(self, app, state: State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}
        t0 = time.perf_counter()
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", rid.encode()), (b"x-content-type-options", b"nosniff")]
                if path == "/" or path.startswith("/static/"):
                    extra.append((b"content-security-policy", CSP.encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        st.metrics.inflight.inc()
        try:
            protected = not (path in OPEN_PATHS or path.startswith(("/static/", "/docs-assets/")))
            if protected and not st.check_key(headers.get("authorization")):
                msg = ("missing API key: send 'Authorization: Bearer <key>'." if not headers.get("authorization")
                       else "invalid API key.")
                await error_response(ApiError(401, "unauthorized", msg))(scope, receive, send_wrapped)
                return
            limit = st.settings.max_body_bytes
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > limit:
                await error_response(ApiError(413, "payload_too_large", f"request body is {cl} bytes; this server "
                                              f"accepts at most {limit}."))(scope, receive, send_wrapped)
                return
            seen = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        raise ApiError(413, "payload_too_large", f"request body exceeds this server's limit of {limit} bytes.")
                return message

            await self.app(scope, receive_limited, send_wrapped)
        finally:
            st.metrics.inflight.dec()
            st.metrics.observe_request(endpoint, status["code"], time.perf_counter() - t0)


# ------------------------------------------------------------------------------ request parsing
async def read_fields(request: Request, settings: ServerSettings) -> tuple[dict[str, Any], bytes | None, bool]:
    """(fields, uploaded image bytes or None, is_json) from a JSON or multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await request.body()
        if not body.strip():
            raise bad_request("the request body is empty; send a JSON object (see /docs).", type="invalid_json")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
            raise bad_request(f"the request body is not valid JSON{where}.", type="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object.", type="invalid_json")
        return data, None, True
    if ctype == "multipart/form-data":
        await request.body()  # read (under the size cap) before parsing
        try:
            try:
                form = await request.form(max_files=settings.max_images_per_request, max_fields=64,
                                          max_part_size=settings.max_upload_bytes + 1)
            except TypeError:  # starlette < 0.40 has no max_part_size (the body is capped anyway)
                form = await request.form(max_files=settings.max_images_per_request, max_fields=64)
        except Exception:  # noqa: BLE001 - malformed multipart
            raise bad_request("malformed multipart/form-data body.") from None
        fields: dict[str, Any] = {}
        upload: bytes | None = None
        for key in set(form.keys()):
            values = form.getlist(key)
            files = [v for v in values if hasattr(v, "read")]
            if files:
                if key not in ("image", "file"):
                    raise bad_request(f"unexpected file field {key!r}; upload the image as 'image'.", key)
                if len(files) > 1:
                    raise bad_request("upload one image per request.", key)
                upload = await files[0].read()
                fields["image"] = "<upload>"
                continue
            if key == "labels":
                fields[key] = values if len(values) > 1 else values[0]
            elif len(values) > 1:
                raise bad_request(f"field {key!r} was given {len(values)} times.", key)
            else:
                fields[key] = values[0]
        if upload is None and "image" not in fields:
            raise bad_request("no image: upload it as the multipart file field 'image'.", "image")
        return fields, upload, False
    if not ctype:
        raise ApiError(415, "unsupported_media_type",
                       "missing Content-Type: send application/json or multipart/form-data.")
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {ctype[:80]!r} is not accepted: send application/json (image as base64) or "
                   "multipart/form-data (image as a file upload).")


def _labels(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(";") if p.strip()] or [value]
    return list(value)


def build_prompt(task: str, req) -> tuple[str, list[str] | None]:
    from ..tasks import prompts

    try:
        if task == "predict":
            labels = _labels(req.labels) or None
            return req.prompt, labels
        if task in ("caption", "describe"):
            return getattr(prompts, task)(req.lang), None
        if task == "ocr":
            return prompts.ocr(), None
        if task == "answer":
            if len(req.question) > 2000:
                raise ValueError("question is too long")
            return prompts.answer(req.question, req.lang), None
        labels = _labels(req.labels)
        if len(labels) > 64:
            raise ValueError(f"{len(labels)} labels; at most 64 per request")
        return getattr(prompts, task)(labels), labels
    except ValueError as e:
        param = {"caption": "lang", "describe": "lang", "answer": "question"}.get(task, "labels")
        if task == "answer" and "language" in str(e):
            param = "lang"
        raise bad_request(clean_message(str(e)), param) from None


def _openapi_body(model) -> dict:
    schema = model.model_json_schema()
    form = {"type": "object", "required": ["image"], "properties": {
        **{k: v for k, v in schema["properties"].items() if k != "image"},
        "image": {"type": "string", "format": "binary", "description": "The image file."}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                           "multipart/form-data": {"schema": form}}}}


def create_app(pg, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP app around one loaded `PaliGemma` (reusable by uvicorn, tests or Ray Serve)."""
    settings = settings or ServerSettings()
    state = State(pg, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.batcher.start()
        warm = asyncio.create_task(_warmup(state))
        try:
            yield
        finally:
            state.ready = False
            warm.cancel()
            await state.batcher.stop()

    app = FastAPI(title="palikit", version="0.1.0", lifespan=lifespan, docs_url=None,
                  description="PaliGemma server: task endpoints with structured results, OpenAI-compatible chat, "
                              "micro-batching. Images as multipart uploads, base64 or data URLs (never URLs).")
    app.state.palikit = state

    # ---------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = {404: f"no such endpoint: {request.url.path[:100]} (see /docs).",
               405: f"method {request.method} is not allowed here (see /docs)."}.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, kind, msg, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(bad_request("invalid request (see /docs)."))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        rid = request.scope.get("state", {}).get("request_id", "?")
        log.exception("request %s failed", rid)
        return error_response(ApiError(500, "internal_error", f"internal server error (request id {rid})."))

    # ---------------------------------------------------------------- health, metrics, playground
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers.")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: model loaded and warmed up, not shutting down.")
    async def readyz():
        if not state.ready:
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", "model": state.name, "queue_depth": state.batcher.depth}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics.", response_class=PlainTextResponse)
    async def metrics():
        state.metrics.queue_depth.set(state.batcher.depth)
        engine = getattr(pg, "engine", None)
        if engine is not None:
            state.metrics.observe_engine(engine.scheduler.stats())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _docs(app)

    # ---------------------------------------------------------------- task endpoints
    def task_route(task: str):
        model = TASK_REQUESTS[task]

        async def endpoint(request: Request):
            fields, upload, is_json = await read_fields(request, settings)
            req = parse_model(model, fields, strict=is_json)
            opts = gen_options(req, settings)
            prompt, labels = build_prompt(task, req)
            state.prompt_tokens(prompt, "prompt" if task == "predict" else
                                {"answer": "question", "detect": "labels", "segment": "labels"}.get(task, "prompt"))
            data = upload if upload is not None else image_bytes_from_string(req.image, settings)
            image = await state.decode(data)
            t0 = time.perf_counter()
            result = await state.run(opts, Item(image, prompt, labels))
            body = result.to_dict()
            body["model"] = state.name
            return JSONResponse(body, headers={"X-Server-Ms": f"{(time.perf_counter() - t0) * 1e3:.1f}"})

        endpoint.__name__ = f"v1_{task}"
        doc = {"predict": "Any prompt on one image.", "caption": "Short caption ('caption {lang}').",
               "describe": "Longer description ('describe {lang}').", "ocr": "Read the text in the image.",
               "answer": "Answer a question about the image.",
               "detect": "Boxes (pixels of the original image) for the given labels.",
               "segment": "Masks (COCO RLE, column-major) and boxes for the given labels."}[task]
        app.post(f"/v1/{task}", tags=["tasks"], summary=doc, openapi_extra=_openapi_body(model),
                 responses={400: {"description": "invalid input"}, 413: {"description": "too large"},
                            503: {"description": "queue full"}, 504: {"description": "timeout"}})(endpoint)

    for t in TASKS:
        task_route(t)

    # ---------------------------------------------------------------- OpenAI compatible
    @app.get("/v1/models", tags=["openai"], summary="The served model (OpenAI format).")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "palikit"}]}

    chat_schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    chat_defs = chat_schema.pop("$defs", {})

    @app.post("/v1/chat/completions", tags=["openai"], summary="OpenAI-compatible chat completions (image as data URL).",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": chat_schema}}}})
    async def chat(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the chat request as application/json.")
        fields, _, _ = await read_fields(request, settings)
        call = openai_compat.parse_chat(parse_model(ChatRequest, fields, strict=True))
        if len(call.images) > settings.max_images_per_request:
            raise bad_request(f"{len(call.images)} images; at most {settings.max_images_per_request} per request.",
                              "messages")
        opts = gen_options(Options(**call.options), settings)
        n_prompt = state.prompt_tokens(call.prompt, "messages")
        datas = [image_bytes_from_string(u, settings, "messages") for u in call.images]
        frames = [await state.decode(d, "messages") for d in datas]
        image = frames[0] if len(frames) == 1 else frames
        n_prompt += _image_tokens(pg) * len(frames)
        cid = openai_compat.new_id()
        mnt = opts.max_new_tokens
        if not call.stream:
            result = await state.run(opts, Item(image, call.prompt, None))
            n = len(result.tokens)
            return openai_compat.completion(cid, state.name, result.text, "length" if n >= mnt else "stop",
                                            openai_compat.usage(n_prompt, n))
        try:
            state.batcher.admit()
        except (QueueFull, Stopped) as e:
            raise openai_compat.stream_error(e, state) from None
        return StreamingResponse(openai_compat.stream(state, cid, image, call, opts, n_prompt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    base_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(chat_defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(ServerMiddleware, state=state)
    return app


def _image_tokens(pg) -> int:
    try:
        return int(pg.model.config.vision.num_image_tokens)
    except Exception:  # noqa: BLE001
        return 0


async def _warmup(state: State) -> None:
    """One tiny prediction through the engine (allocates the cache; compiles the step when asked), then ready."""
    if state.settings.warmup:
        from PIL import Image

        opts = gen_options(Options(max_new_tokens=2), state.settings)
        try:
            await state.run(opts, Item(Image.new("RGB", (32, 32), (128, 128, 128)), "caption en", None),
                            timeout_s=state.settings.request_timeout_s * 5)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("warm-up prediction failed")
            return
    state.ready = True


def _docs(app: FastAPI) -> None:
    """/docs from the swagger-ui-bundle package when installed (works offline, where self-hosted
    servers usually are); FastAPI's CDN page otherwise."""
    from fastapi.openapi.docs import get_swagger_ui_html

    urls = {}
    try:
        from swagger_ui_bundle import swagger_ui_path

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
        urls = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    except ImportError:
        pass

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="palikit API", **urls)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ServerSettings", "create_app", "decode_image", "image_bytes_from_string", "is_loopback"]
