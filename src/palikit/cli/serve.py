"""`palikit serve`: the HTTP server (FastAPI + uvicorn) for one model; docs at /docs, playground at /.

Safe defaults: on a loopback bind only loopback Host names are served (DNS rebinding); a connection
must send its request headers within --header-timeout seconds (slowloris); idle keep-alive
connections close after --keep-alive seconds; glibc is told to return large freed blocks to the
system, so memory goes back down after a burst of big images."""

from __future__ import annotations

import sys

import typer

from ..serve.settings import ServerSettings
from . import app

_D = ServerSettings()  # the defaults (one home: every flag below that mirrors a setting reads it here)


@app.command("serve")
def serve(
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint folder, big_vision .npz or Hub id (default: bundled demo)."),
    host: str = typer.Option(_D.host, help="Address to bind. Anything but loopback exposes the server: set --api-key."),
    port: int = typer.Option(_D.port, help="Port to bind (0 = any free port)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (bf16 on GPU)."),
    tokenizer: str = typer.Option(None, help="Tokenizer file when it is not next to the weights."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the decode step: CUDA graphs "
                                 "on GPU (default there), fused C++ kernels on CPU (off by default: see README, Speed)."),
    adapter: list[str] = typer.Option(None, "--adapter", help="NAME=PATH: a LoRA adapter (PEFT folder) served "
                                      "unmerged under NAME, batched with the others (repeatable; requests pick it "
                                      "with \"adapter\": NAME or chat model: NAME). A PATH alone: merged into --model."),
    max_loras: int = typer.Option(None, help="Adapters on the device at once (default: the NAME=PATH count, 4 with "
                                  "--adapter-dir); more wait in CPU memory."),
    max_lora_rank: int = typer.Option(16, help="Largest LoRA rank accepted (device slots are this wide)."),
    max_cpu_loras: int = typer.Option(None, help="Adapters kept in CPU memory (LRU; default max-loras; evicted ones "
                                      "are read from disk again)."),
    adapter_dir: str = typer.Option(None, help="POST /v1/adapters may load folders under this directory only "
                                    "(off without it)."),
    quantize: str = typer.Option(None, "--quantize", help="int8 or int4: quantize the weights at load."),
    api_key: list[str] = typer.Option(None, "--api-key", help="Accepted Bearer key (repeatable); also env PALIKIT_API_KEYS (comma-separated)."),
    max_slots: int = typer.Option(_D.max_slots, help="Engine slots: requests decoding together (continuous batching)."),
    max_batch_size: int = typer.Option(None, hidden=True, help="Deprecated name of --max-slots."),
    max_queue: int = typer.Option(_D.max_queue, help="Requests waiting for a slot beyond which new ones get 503 + "
                                  "Retry-After."),
    timeout: float = typer.Option(_D.request_timeout_s, "--timeout", help="Seconds per request (queue + generation) "
                                  "before 504."),
    max_upload_mb: float = typer.Option(_D.max_upload_bytes / 2**20, help="Largest image file accepted (MB)."),
    max_image_pixels: int = typer.Option(_D.max_image_pixels, help="Largest image accepted, width x height "
                                         "(decompression bombs)."),
    max_aspect_ratio: float = typer.Option(_D.max_aspect_ratio, help="Most elongated image accepted (longer side / "
                                           "shorter side)."),
    decode_budget_mb: float = typer.Option(_D.decode_budget_bytes / 2**20, help="Memory image decoding may hold, all "
                                           "requests together (MB; a 16-bit or transparent image costs several times "
                                           "an RGB one; beyond: 429 + Retry-After)."),
    decode_budget_mpx: float = typer.Option(None, hidden=True, help="Deprecated: --decode-budget-mb (bytes, not pixels)."),
    allowed_hosts: str = typer.Option(None, help="Comma-separated Host names served ('*' = any). Default: loopback "
                                      "names when bound to loopback, any otherwise."),
    header_timeout: float = typer.Option(_D.header_timeout_s, help="Seconds a connection has to send complete request "
                                         "headers."),
    keep_alive: int = typer.Option(_D.keep_alive_s, help="Seconds an idle keep-alive connection stays open."),
    body_timeout: float = typer.Option(_D.body_timeout_s, help="Seconds a request has to send its whole body (slow "
                                       "uploads are closed)."),
    max_connections: int = typer.Option(_D.max_connections, help="Open connections and requests at once (beyond: "
                                        "503)."),
    shutdown_timeout: float = typer.Option(_D.shutdown_timeout_s, help="On SIGTERM: seconds running requests get to "
                                           "finish (new ones get 503 at once); those still running then get 503."),
    protect_docs: bool = typer.Option(_D.protect_docs, "--protect-docs", help="Put the docs, the OpenAPI schema, the "
                                      "playground and /readyz behind the API key too (only /healthz stays open)."),
    allow_unauthenticated: bool = typer.Option(False, "--allow-unauthenticated", help="Allow binding beyond loopback "
                                               "with no API key (anyone who reaches the address can use the model)."),
    max_new_tokens_limit: int = typer.Option(_D.max_new_tokens_limit, help="Largest max_new_tokens a client may ask for."),
    max_prompt_chars: int = typer.Option(_D.max_prompt_chars, help="Longest prompt accepted (characters)."),
    warmup: bool = typer.Option(_D.warmup, help="Run one tiny prediction before /readyz reports ready."),
    name: str = typer.Option(None, "--name", help="The model name clients see (/v1/models, chat 'model', answers). "
                             "Default: the run's name for a trainer's output folder (runs/NAME/final), else the "
                             "model's."),
    access_log: bool = typer.Option(_D.access_log, "--access-log/--no-access-log", help="One log line per request "
                                    "(method, path, status, ms, model, request id)."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads (0 = torch's default; 1 is fastest for tiny models)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    replicas: int = typer.Option(0, help="Serve N replicas with Ray Serve (one per GPU when there are GPUs); 0 = one process."),
    min_replicas: int = typer.Option(None, help="Ray Serve autoscaling lower bound (with --max-replicas)."),
    max_replicas: int = typer.Option(None, help="Ray Serve autoscaling upper bound."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster instead of starting a local Ray."),
):
    """Serve the model over HTTP: /v1/{predict,caption,describe,ocr,answer,detect,segment},
    /v1/chat/completions (OpenAI-compatible), /healthz, /readyz, /metrics, playground at /."""
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise ImportError(f"the server needs extra packages ({e.name} is missing): "
                          "pip install fastapi uvicorn python-multipart prometheus-client") from None
    from ..serve.settings import is_loopback
    from .predict import load_model

    if max_batch_size is not None:
        if max_slots not in (_D.max_slots, max_batch_size):
            raise ValueError("--max-batch-size is the old name of --max-slots: give one of them.")
        print("palikit: --max-batch-size is deprecated (it sets the engine's slots): use --max-slots.",
              file=sys.stderr, flush=True)
        max_slots = max_batch_size
    if decode_budget_mpx is not None:  # the old pixel budget, read as 8-bit RGB images (3 bytes a pixel)
        decode_budget_mb = decode_budget_mpx * 1e6 * 3 / 2**20
        print(f"palikit: --decode-budget-mpx is deprecated (the budget counts bytes now: a 16-bit or transparent "
              f"image costs more than an RGB one): read as --decode-budget-mb {decode_budget_mb:.0f}.",
              file=sys.stderr, flush=True)
    keys = tuple(api_key or ()) + ServerSettings.keys_from_env()
    if not is_loopback(host) and not keys:
        if not allow_unauthenticated:
            raise ValueError(f"binding to {host} with no API key would let anyone who reaches this address use the "
                             "model: set --api-key (or PALIKIT_API_KEYS), bind to 127.0.0.1, or pass "
                             "--allow-unauthenticated.")
        bar = "!" * 78
        print(f"{bar}\nWARNING: binding to {host} with NO API key (--allow-unauthenticated): anyone who can reach "
              f"this address can use the model.\n{bar}", file=sys.stderr)
    settings = ServerSettings(host=host, port=port, api_keys=keys, max_slots=max_slots, access_log=access_log,
                              max_queue=max_queue, request_timeout_s=timeout,
                              max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                              max_new_tokens_limit=max_new_tokens_limit, max_prompt_chars=max_prompt_chars,
                              warmup=warmup, max_aspect_ratio=max_aspect_ratio,
                              decode_budget_bytes=int(decode_budget_mb * 2**20),
                              allowed_hosts=(tuple(allowed_hosts.split(",")) if allowed_hosts
                                             else ServerSettings.default_allowed_hosts(host)),
                              header_timeout_s=header_timeout, keep_alive_s=keep_alive, body_timeout_s=body_timeout,
                              max_connections=max_connections, shutdown_timeout_s=shutdown_timeout,
                              protect_docs=protect_docs, adapter_dir=adapter_dir)
    merged, named = split_adapters(adapter or [])
    if replicas or min_replicas is not None or max_replicas is not None:
        from ..distributed.ray_serve import serve_replicas
        from .predict import default_model

        print(f"palikit: serving with Ray Serve ({replicas or 'autoscaled'} replicas) on http://{host}:{port}",
              file=sys.stderr, flush=True)
        serve_replicas(default_model(model), host=host, port=port, settings=settings, replicas=max(replicas, 1),
                       min_replicas=min_replicas, max_replicas=max_replicas, device=device, dtype=dtype,
                       address=ray_address, quantize=quantize)
        return
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)
    if compile is None:
        from ..runtime import resolve_device

        compile = resolve_device(device).type == "cuda"
    if compile and warmup:
        print("palikit: compiling the decode step during warm-up (once per cache-length bucket; CUDA graphs on GPU, "
              "the reason it is faster there); /readyz says ready when done. --no-compile skips it.",
              file=sys.stderr, flush=True)
    pg = load_model(model, device, dtype, tokenizer, compile=compile, adapter=merged, quantize=quantize)
    if named or adapter_dir or max_loras:
        pg.enable_adapters(max_loras or max(len(named), 4 if adapter_dir else 1), max_lora_rank, max_cpu_loras)
        for adapter_name, path in named.items():
            pg.load_adapter(adapter_name, path)
    from ..serve.settings import default_served_name

    settings.served_name = name or default_served_name(model, pg.name)
    application = create_app(pg, settings)
    from ..serve.protocol import draining_server, guarded_h11

    _log_to_stderr(log_level, access_log)
    _return_freed_memory()
    config = uvicorn.Config(application, host=host, port=port, log_level=log_level, access_log=False,
                            http=guarded_h11(header_timeout, body_timeout), timeout_keep_alive=keep_alive,
                            h11_max_incomplete_event_size=16 * 1024, limit_concurrency=max_connections)
    sock = config.bind_socket()  # bound here, so the banner names the real port (--port 0: the one chosen)
    auth = f"{len(keys)} API key(s)" if keys else "no API key"
    served = settings.served_name + (f" + adapter {merged}" if merged else "") + \
        (f"; adapters {', '.join(named)}" if named else "")
    shown = f"[{host}]" if ":" in host else host
    print(f"palikit: serving {served} on http://{shown}:{sock.getsockname()[1]} ({auth}); docs at /docs, "
          "playground at /", file=sys.stderr, flush=True)
    draining_server(config, application.state.palikit.front, shutdown_timeout).run(sockets=[sock])


def split_adapters(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """--adapter values -> (the one PATH to merge, or None; {NAME: PATH} served unmerged)."""
    merged, named = [], {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name and "/" not in name and path:
            if name in named:
                raise ValueError(f"--adapter: the name {name!r} is given twice")
            named[name] = path
        else:
            merged.append(v)
    if len(merged) > 1 or (merged and named):
        raise ValueError("--adapter: a PATH alone merges that one adapter into the model; give several side by side "
                         "as NAME=PATH (repeatable)")
    return (merged[0] if merged else None), named


def _log_to_stderr(level: str, access_log: bool = True) -> None:
    """The server's own lines (palikit.serve: client aborts, closed slow connections, failures) next to
    uvicorn's, at the same level; the access log (palikit.access, one line per request) unless turned off."""
    import logging

    logger = logging.getLogger("palikit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper() if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO")
    logging.getLogger("palikit.access").setLevel("INFO" if access_log else "CRITICAL")


def _return_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse and raises its mmap threshold as big blocks come and
    go, so a server that decoded a few large images would keep their RSS for good. A fixed 1 MB
    threshold makes image-sized blocks mmap'd, returned to the system when freed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic increase)
        libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD: give back free heap tops over 8 MB
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass
