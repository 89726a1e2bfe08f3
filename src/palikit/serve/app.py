"""The FastAPI app: `create_app(pg, settings)` -> task endpoints, OpenAI-compatible chat, health,
metrics and the browser playground, in front of one `PaliGemma` and its continuous-batching engine.

Life of a request (`POST /v1/detect`, JSON or multipart):
1. `ServerMiddleware` (pure ASGI, on the event loop): request id, Host allowlist, cross-site browser
   requests on a keyless server, API key, the body cap (from Content-Length before reading, then
   counted while reading); at the end the status, latency and a client abort go to the metrics and
   one access-log line (`palikit.access`).
2. The task route (`task_route`): `read_fields` reads the body; the task's request model (built from
   the task table) validates it; `gen_options` makes the one `PredictOptions` (server limits
   applied); `Task.prompt` builds the prompt and cleans the labels once; `State.prompt_ids` tokenizes
   the prompt once and checks its length. All of this before the image is touched.
3. `State.decode` (worker thread): the bounded image intake of `images.py` loads the image once and
   keeps it at model size (the original size rides along for the boxes).
4. `EngineFront.submit` (worker thread): `PaliGemma.submit` turns that image into pixels and queues
   ids + pixels + options on the engine scheduler, the one admission point (full: 503 + Retry-After).
5. The scheduler thread admits it into a slot between decode steps, prefills it with the others, and
   decodes until EOS or `max_new_tokens` (tokens stream out through `on_text` for streaming chat).
6. `EngineFront.result` (worker thread, within the request timeout): `Pending.result` turns the ids
   into text once while parsing boxes and masks (scores per token; the masks of a result in one
   codec call); the route answers `Result.to_dict()`. While it waits, the route listens for the
   client's disconnect (`until_disconnect`): a client that leaves cancels its generation at once.
Any exception on the way becomes its HTTP error in one place, `errors.api_error` (the app's exception
handlers, and the error event of a streaming chat).

Images come only as bytes: a multipart upload, base64 or a data URL. The server never fetches a
URL and never opens a path a client names; images go through the bounded intake of `images.py`
(format allowlist, header checks, decoding's byte budget, model-size pixels while waiting). Every
limit (body bytes per endpoint, counted while reading; JSON nesting; image bytes, pixels and aspect
ratio; labels; prompt length; max_new_tokens) answers a 4xx JSON error `{"error": {"type",
"message"}}`; unexpected failures answer 500 with a request id and no details (the traceback goes
to the server log). A client that goes away mid-request is one info line and counts as status 499
(`palikit_client_aborts_total`), not a server error; so does a stream it leaves. The Host header must
be one of the allowed names (loopback names and the bound address on a loopback bind: DNS rebinding),
else 400. A server with no API key refuses cross-site browser requests (`Origin` not its own, or
`Sec-Fetch-Site` cross-site / same-site: a web page's form or text/plain POST needs no preflight);
`--protect-docs` puts every path but /healthz behind the key.
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
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from ..tasks.options import PredictOptions
from ..tasks.registry import get_task, tasks_where
from . import openai_compat
from .adapters import AdapterGauges, add_adapter_routes, served_models
from .docs import mount_docs
from .errors import ApiError, api_error, bad_request, handled_exceptions
from .front import EngineFront, Item
from .images import DecodeBudget, decode_image, image_bytes_from_string
from .metrics import Metrics
from .parsing import _openapi_body, build_prompt, prompt_param, read_fields, request_choices
from .schemas import ChatRequest, Options, gen_options, parse_model, request_model
from .settings import ServerSettings

log = logging.getLogger("palikit.serve")
access_log = logging.getLogger("palikit.access")
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
        self.front = EngineFront(pg, max_slots=settings.max_slots, max_queue=settings.max_queue, on_done=self._done)
        self.name = settings.served_name or getattr(pg, "name", "paligemma")
        self.tasks = [t.name for t in tasks_where("http")]  # POST /v1/<task>, from the task table
        self.endpoints = ENDPOINTS | {f"/v1/{t}" for t in self.tasks}  # metric labels
        # decoding runs in worker threads (never on the model thread): a few at once, within the pixel budget
        self.decode_limiter = anyio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))
        self.decode_budget = DecodeBudget(settings.decode_budget_bytes)
        self.processor = getattr(pg, "processor", None)
        from prometheus_client import Counter

        self.adapter_gauges = AdapterGauges(self.metrics.registry)
        self.client_aborts = Counter("palikit_client_aborts", "Requests the client abandoned before the answer "
                                     "(counted as status 499, not as server errors).", registry=self.metrics.registry)

    async def decode(self, data: bytes, param: str = "image"):
        """Bytes -> model-ready PIL image, in a worker thread (see images.py)."""
        def work():
            return decode_image(data, self.settings, param, processor=self.processor, budget=self.decode_budget)

        return await anyio.to_thread.run_sync(work, limiter=self.decode_limiter)

    def _done(self, result, seconds: float) -> None:
        self.metrics.observe_generation(len(result.tokens), seconds)

    def served_names(self) -> list[str]:
        """The model names clients may send (`model` on chat, listed by /v1/models): the base, then each
        loaded adapter (`serve.adapters.served_models`)."""
        return [self.name, *getattr(self.pg, "adapters", [])]

    def check_model(self, model: str | None) -> None:
        """A 404 listing the served names for a model this server does not serve (as OpenAI answers)."""
        names = self.served_names()
        if model is not None and model not in names:
            raise ApiError(404, "model_not_found", f"the model {model[:100]!r} is not served here; this server "
                           f"serves {', '.join(map(repr, names))} (GET /v1/models).", param="model")

    def prompt_ids(self, prompt: str, param: str = "prompt") -> list[int]:
        """The prompt's token ids (tokenized here, once: the engine gets these), or a 400 naming `param`."""
        s = self.settings
        if len(prompt) > s.max_prompt_chars:
            raise bad_request(f"prompt is {len(prompt)} characters; this server accepts at most {s.max_prompt_chars}.",
                              param)
        if not prompt.strip():
            raise bad_request("prompt is empty: e.g. 'caption en', 'ocr', 'answer en what is this', 'detect cat'.",
                              param)
        try:
            return self.pg.encode_prompt(prompt)
        except ValueError as e:
            raise bad_request(str(e), param) from None

    async def run(self, opts: PredictOptions, item: Item, timeout_s: float | None = None,
                  request: Request | None = None) -> Any:
        """The Result of one generation, within the request timeout. With `request`, a client that
        disconnects while it waits cancels the generation at once (its slot is freed at the next
        step) and the route ends with ClientDisconnect (counted as 499)."""
        job = self.front.run(item, opts, timeout_s or self.settings.request_timeout_s)
        if request is None:
            return await job
        return await until_disconnect(request, job)

    def error(self, e: BaseException, request: Request | None = None) -> ApiError:
        """`errors.api_error` with this server's timeout and the request's id, method and path."""
        if request is None:
            return api_error(e, timeout_s=self.settings.request_timeout_s)
        return api_error(e, timeout_s=self.settings.request_timeout_s, method=request.method,
                         path=request.url.path, request_id=request.scope.get("state", {}).get("request_id", "?"))

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


async def until_disconnect(request: Request, awaitable) -> Any:
    """Await `awaitable` while listening for the client's disconnect (the body is already read, so
    the next ASGI message is `http.disconnect`); a client that leaves cancels it (the engine front then
    cancels the engine ticket) and raises ClientDisconnect."""
    job = asyncio.ensure_future(awaitable)

    async def gone() -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a server whose receive fails cannot tell: wait for the answer
            await asyncio.Event().wait()

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, watch):
            if not task.done():
                task.cancel()
    if job.done() and not job.cancelled():
        return job.result()
    with contextlib.suppress(asyncio.CancelledError):
        await job  # let its cancellation (the engine ticket's too) run before answering
    raise ClientDisconnect()


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
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["complete"] = True
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
            # gone before the answer (a stream cut short too: not a 200)
            if status.get("gone") and (status["code"] in (500, CLIENT_GONE) or not status.get("complete")):
                status["code"] = CLIENT_GONE
                st.client_aborts.inc()
                log.info("request %s to %s: the client disconnected before the answer", rid, path)
        finally:
            seconds = time.perf_counter() - t0
            st.metrics.inflight.dec()
            st.metrics.observe_request(endpoint, status["code"], seconds)
            if st.settings.access_log:
                access_log.info("%s %s %d %.1fms model=%s id=%s", scope.get("method", "?"), path[:200], status["code"],
                                seconds * 1e3, scope["state"].get("model", st.name), rid)

    def _refusal(self, path: str, headers: dict[str, str]) -> ApiError | None:
        """The error to answer before reading anything, or None."""
        st = self.state
        if self.hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.hosts:
                return ApiError(400, "invalid_host", f"Host {host[:80]!r} is not served here (DNS rebinding guard); "
                                f"use one of {', '.join(self.hosts)}, or start the server with --allowed-hosts.")
        protected = not (path in OPEN_PATHS or path.startswith(("/static/", "/docs-assets/")))
        if st.settings.protect_docs:
            protected = path != "/healthz"
        if protected and not st.settings.api_keys and _cross_site(headers):
            return ApiError(403, "cross_site_request", "cross-site browser requests are refused by a server with no "
                            "API key (a web page cannot make it run the model); start it with --api-key, or call it "
                            "from its own origin (the playground) or a non-browser client.")
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


def _cross_site(headers: dict[str, str]) -> bool:
    """Whether a browser sent this request from another site or origin: `Sec-Fetch-Site` (cross-site,
    same-site), or an `Origin` that is not the request's own host (simple POSTs with text/plain or form
    bodies need no CORS preflight, so the browser sends them anyway; only these headers tell)."""
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    own = headers.get("host", "").strip().lower()
    return origin.strip().lower().split("://", 1)[-1].rstrip("/") != own


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
        await state.front.start()
        warm = asyncio.create_task(_warmup(state))
        try:
            yield
        finally:
            state.ready = False
            warm.cancel()
            await state.front.stop()

    app = FastAPI(title="palikit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="PaliGemma server: task endpoints with structured results, OpenAI-compatible chat, "
                              "continuous batching. Images as multipart uploads, base64 or data URLs (never URLs).")
    app.state.palikit = state

    # ---------------------------------------------------------------- errors: one mapping (errors.api_error)
    async def _error(request: Request, e: Exception):
        return error_response(state.error(e, request))

    for exc in handled_exceptions():
        app.add_exception_handler(exc, _error)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, e: ClientDisconnect):
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the middleware logs and counts the abort

    # ---------------------------------------------------------------- health, metrics, playground
    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers.")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: model loaded and warmed up, not shutting down.")
    async def readyz():
        if not state.ready or state.front.stopped:
            return JSONResponse({"status": "starting" if not state.ready else "shutting down"}, status_code=503,
                                headers={"Retry-After": "1"})
        return {"status": "ready", "model": state.name, "queue_depth": state.front.depth}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics.", response_class=PlainTextResponse)
    async def metrics():
        state.metrics.queue_depth.set(state.front.depth)
        engine = getattr(pg, "engine", None)
        if engine is not None:
            state.metrics.observe_engine(engine.scheduler.stats())
            state.adapter_gauges.observe(None if engine.adapters is None else engine.adapters.stats())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    mount_docs(app)

    # ---------------------------------------------------------------- task endpoints
    for t in state.tasks:
        app.post(f"/v1/{t}", tags=["tasks"], summary=get_task(t).summary, openapi_extra=_openapi_body(request_model(t)),
                 responses={400: {"description": "invalid input"}, 413: {"description": "too large"},
                            503: {"description": "queue full"}, 504: {"description": "timeout"}})(task_route(state, t))

    # ---------------------------------------------------------------- OpenAI compatible
    @app.get("/v1/models", tags=["openai"], summary="The served model and its LoRA adapters (OpenAI format).")
    async def models():
        return {"object": "list", "data": served_models(state)}

    add_adapter_routes(app, state)

    chat_schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    chat_defs = chat_schema.pop("$defs", {})
    app.post("/v1/chat/completions", tags=["openai"], summary="OpenAI-compatible chat completions (image as data URL).",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": chat_schema}}}}
             )(openai_compat.chat_completions)

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


def task_route(state: State, task: str):
    """The endpoint `POST /v1/<task>` (steps 2-6 of the life of a request, module docstring)."""
    model = request_model(task)
    param = prompt_param(task)
    settings = state.settings

    async def endpoint(request: Request):
        fields, upload, is_json = await read_fields(request, settings)
        req = parse_model(model, fields, strict=is_json)
        opts = gen_options(req, settings)
        prompt, labels = build_prompt(task, req, settings.max_labels)
        ids = state.prompt_ids(prompt, param)
        choices = request_choices(req, state.pg)
        data = upload if upload is not None else image_bytes_from_string(req.image, settings)
        del fields, upload, req
        image = await state.decode(data)
        del data  # while it waits for the model, the request holds only the model-size image
        t0 = time.perf_counter()
        result = await state.run(opts, Item(image, prompt, ids, labels, choices), request=request)
        body = result.to_dict()
        body["model"] = state.name
        return JSONResponse(body, headers={"X-Server-Ms": f"{(time.perf_counter() - t0) * 1e3:.1f}"})

    endpoint.__name__ = f"v1_{task}"
    return endpoint


async def _warmup(state: State) -> None:
    """One tiny prediction through the engine (allocates the cache; compiles the step when asked), then ready."""
    if state.settings.warmup:
        from PIL import Image

        opts = gen_options(Options(max_new_tokens=2), state.settings)
        image = Image.new("RGB", (32, 32), (128, 128, 128))
        try:
            if state.processor is not None:
                image = state.processor.model_ready(image)
            await state.run(opts, Item(image, "caption en", state.prompt_ids("caption en"), None),
                            timeout_s=state.settings.request_timeout_s * 5)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("warm-up prediction failed")
            return
    state.ready = True


__all__ = ["ServerSettings", "create_app", "decode_image", "image_bytes_from_string"]
