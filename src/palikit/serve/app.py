"""The FastAPI app: `create_app(pg, settings)` -> task endpoints, OpenAI-compatible chat, health,
metrics and the browser playground, in front of one `PaliGemma` and its continuous-batching engine.

Images come only as bytes: a multipart upload, base64 or a data URL. The server never fetches a
URL and never opens a path a client names; images go through the bounded intake of `images.py`
(format allowlist, header checks, decoded-pixel budget, model-size pixels while waiting). Every
limit (body bytes per endpoint, counted while reading; JSON nesting; image bytes, pixels and aspect
ratio; labels; prompt length; max_new_tokens) answers a 4xx JSON error `{"error": {"type",
"message"}}`; unexpected failures answer 500 with a request id and no details (the traceback goes
to the server log). A client that goes away mid-request is one info line and counts as status 499
(`palikit_client_aborts_total`), not a server error. The Host header must be one of the allowed names
(loopback names on a loopback bind: DNS rebinding), else 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..tasks.options import PredictOptions
from ..tasks.registry import get_task, tasks_where
from . import openai_compat
from .batcher import EngineFront, QueueFull, Stopped
from .docs import mount_docs
from .images import PixelBudget, decode_image, image_bytes_from_string
from .metrics import Metrics
from .parsing import _openapi_body, build_prompt, prompt_param, read_fields
from .schemas import (ApiError, ChatRequest, Item, Options, ServerSettings, bad_request, clean_message, gen_options,
                      is_loopback, parse_model, request_model)

log = logging.getLogger("palikit.serve")
STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
              "/favicon.ico")
ENDPOINTS = {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/", "/docs", "/redoc",
             "/openapi.json"}  # plus /v1/<task> for each HTTP task of the task table (create_app)
CLIENT_GONE = 499  # nginx's "client closed request": counted apart from the 5xx
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'")
# the docs pages: their own bundled scripts plus FastAPI's inline start-up script; nothing from elsewhere
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")


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
        self.tasks = [t.name for t in tasks_where("http")]  # POST /v1/<task>, from the task table
        self.endpoints = ENDPOINTS | {f"/v1/{t}" for t in self.tasks}  # metric labels
        from ..api import MAX_PROMPT_TOKENS

        self.max_prompt_tokens = MAX_PROMPT_TOKENS
        # decoding runs in worker threads (never on the model thread): a few at once, within the pixel budget
        self.decode_limiter = anyio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))
        self.pixel_budget = PixelBudget(settings.decode_budget_pixels)
        self.processor = getattr(pg, "processor", None)
        from prometheus_client import Counter

        self.client_aborts = Counter("palikit_client_aborts", "Requests the client abandoned before the answer "
                                     "(counted as status 499, not as server errors).", registry=self.metrics.registry)

    async def decode(self, data: bytes, param: str = "image"):
        """Bytes -> model-ready PIL image, in a worker thread (see images.py)."""
        def work():
            return decode_image(data, self.settings, param, processor=self.processor, budget=self.pixel_budget)

        return await anyio.to_thread.run_sync(work, limiter=self.decode_limiter)

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

    async def run(self, opts: PredictOptions, item: Item, on_text=None, timeout_s: float | None = None) -> Any:
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
    """Pure ASGI: request ids, Host allowlist, API-key check, per-endpoint body cap (counted while
    reading), client aborts, metrics, security headers."""

    def __init__(self, app, state: State):
        self.app = app
        self.state = state
        self.hosts = state.settings.host_allowlist()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path = scope["path"]
        endpoint = path if path in st.endpoints else ("/static" if path.startswith("/static/") else "other")
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}
        t0 = time.perf_counter()
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", rid.encode()), (b"x-content-type-options", b"nosniff")]
                if path == "/" or path.startswith(("/static/", "/docs", "/redoc")):
                    extra.append((b"content-security-policy", (CSP if path == "/" or path.startswith("/static/")
                                                               else DOCS_CSP).encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        st.metrics.inflight.inc()
        try:
            refusal = self._refusal(path, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_wrapped)
                return
            limit = st.settings.body_limit(path)
            seen = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        raise ApiError(413, "payload_too_large",
                                       f"request body exceeds this endpoint's limit of {limit} bytes.")
                elif message["type"] == "http.disconnect":
                    status["gone"] = True
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except ClientDisconnect:
                status["gone"] = True
            if status.get("gone") and status["code"] in (500, CLIENT_GONE):
                status["code"] = CLIENT_GONE
                st.client_aborts.inc()
                log.info("request %s to %s: the client disconnected before the answer", rid, path)
        finally:
            st.metrics.inflight.dec()
            st.metrics.observe_request(endpoint, status["code"], time.perf_counter() - t0)

    def _refusal(self, path: str, headers: dict[str, str]) -> ApiError | None:
        """The error to answer before reading anything, or None."""
        st = self.state
        if self.hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.hosts:
                return ApiError(400, "invalid_host", f"Host {host[:80]!r} is not served here (DNS rebinding guard); "
                                f"use one of {', '.join(self.hosts)}, or start the server with --allowed-hosts.")
        protected = not (path in OPEN_PATHS or path.startswith(("/static/", "/docs-assets/")))
        if protected and not st.check_key(headers.get("authorization")):
            msg = ("missing API key: send 'Authorization: Bearer <key>'." if not headers.get("authorization")
                   else "invalid API key.")
            return ApiError(401, "unauthorized", msg)
        limit = st.settings.body_limit(path)
        cl = headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            return ApiError(413, "payload_too_large", f"request body is {cl} bytes; this endpoint accepts at most "
                            f"{limit}.")
        return None


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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

    app = FastAPI(title="palikit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
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

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, e: ClientDisconnect):
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the middleware logs and counts the abort

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
    mount_docs(app)

    # ---------------------------------------------------------------- task endpoints
    def task_route(task: str):
        model = request_model(task)
        param = prompt_param(task)

        async def endpoint(request: Request):
            fields, upload, is_json = await read_fields(request, settings)
            req = parse_model(model, fields, strict=is_json)
            opts = gen_options(req, settings)
            prompt, labels = build_prompt(task, req, settings.max_labels)
            state.prompt_tokens(prompt, param)
            data = upload if upload is not None else image_bytes_from_string(req.image, settings)
            del fields, upload, req
            image = await state.decode(data)
            del data  # while it waits for the model, the request holds only the model-size image
            t0 = time.perf_counter()
            result = await state.run(opts, Item(image, prompt, labels))
            body = result.to_dict()
            body["model"] = state.name
            return JSONResponse(body, headers={"X-Server-Ms": f"{(time.perf_counter() - t0) * 1e3:.1f}"})

        endpoint.__name__ = f"v1_{task}"
        app.post(f"/v1/{task}", tags=["tasks"], summary=get_task(task).summary, openapi_extra=_openapi_body(model),
                 responses={400: {"description": "invalid input"}, 413: {"description": "too large"},
                            503: {"description": "queue full"}, 504: {"description": "timeout"}})(endpoint)

    for t in state.tasks:
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
        call.images, fields = [], None
        frames = []
        while datas:
            frames.append(await state.decode(datas.pop(0), "messages"))
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


__all__ = ["ServerSettings", "create_app", "decode_image", "image_bytes_from_string", "is_loopback"]
