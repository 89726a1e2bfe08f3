"""The single-process HTTP app (`palikit.serve.app.create_app`) as a Ray Serve deployment: N
replicas (one per GPU when there are GPUs), optional autoscaling bounds, the same endpoints and
limits. Each replica builds its own app around its own model (the ingress builder runs on the
replica), and answers carry an `x-palikit-replica` header so spreading is visible.

    from palikit.distributed.ray_serve import serve_replicas
    serve_replicas("path/to/checkpoint", replicas=2, port=8000)       # blocks until Ctrl-C

or `palikit serve --model M --replicas N`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

REPLICA_HEADER = "x-palikit-replica"
PROXY_TIMEOUT_MARGIN_S = 10.0  # upload and answer transfer on top of the app's own request_timeout_s


def proxy_http_options(host: str, port: int, settings=None) -> dict[str, Any]:
    """`serve.start`'s http_options: where the proxy listens, and an end-to-end bound on every request.
    The app answers 504 at `request_timeout_s`; the proxy's bound (that plus a margin) covers what the
    app cannot see, a request that was on a replica when the replica died."""
    from ..serve.settings import ServerSettings

    settings = settings or ServerSettings()
    return {"host": host, "port": port, "request_timeout_s": settings.request_timeout_s + PROXY_TIMEOUT_MARGIN_S}


def build_application(model: str, *, settings=None, replicas: int = 1, min_replicas: int | None = None,
                      max_replicas: int | None = None, device: str = "auto", dtype: str = "auto",
                      cpus_per_replica: float = 1.0, name: str = "palikit", quantize: str | None = None):
    """A Ray Serve `Application` ready for `serve.run`. With min/max replicas it autoscales."""
    from ray import serve

    from ..serve.settings import ServerSettings

    settings = settings or ServerSettings()

    def build_app():
        import socket

        from ..api import PaliGemma
        from ..serve.app import create_app

        pg = PaliGemma.from_pretrained(model, device=device, dtype=dtype, quantize=quantize)
        app = create_app(pg, settings)
        tag = f"{socket.gethostname()}:{os.getpid()}"

        @app.middleware("http")
        async def replica_header(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = tag
            return response

        return app

    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
                               "max_ongoing_requests": settings.max_queue + settings.max_slots}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max_replicas if max_replicas is not None else max(lo, replicas)
        if not 0 <= lo <= hi:
            raise ValueError(f"autoscaling bounds must satisfy 0 <= min ({lo}) <= max ({hi})")
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, min(replicas, hi)),
                                         "target_ongoing_requests": max(2, settings.max_slots // 2)}
    else:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress(build_app)(), name=name, **options)
    return deployment.bind()


def serve_replicas(model: str, *, host: str = "127.0.0.1", port: int = 8000, settings=None, replicas: int = 1,
                   min_replicas: int | None = None, max_replicas: int | None = None, device: str = "auto",
                   dtype: str = "auto", address: str | None = None, block: bool = True, quantize: str | None = None):
    """Start Ray (local, or join `address`), deploy, and serve HTTP on host:port."""
    import ray
    from ray import serve

    from ..serve.settings import ServerSettings

    settings = replace(settings or ServerSettings(), host=host, port=port)
    if not ray.is_initialized():
        from .ray_batch import init_ray

        init_ray(address)  # a local Ray listens on loopback only
    serve.start(http_options=proxy_http_options(host, port, settings))
    app = build_application(model, settings=settings, replicas=replicas, min_replicas=min_replicas,
                            max_replicas=max_replicas, device=device, dtype=dtype, quantize=quantize)
    handle = serve.run(app, name="palikit", route_prefix="/", blocking=False)
    if block:
        import signal
        import time

        def _stop(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)  # `kill` shuts the replicas down cleanly, like Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
            ray.shutdown()
    return handle
