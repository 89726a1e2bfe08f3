"""Self-hosted HTTP server for PaliGemma: task endpoints with structured results, an
OpenAI-compatible chat endpoint, continuous batching, Prometheus metrics and a browser playground.

    from palikit.serve import create_app, ServerSettings
    app = create_app(PaliGemma.from_pretrained(...), ServerSettings(api_keys=("secret",)))

Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus-client), imported on first use
of `create_app`: `ServerSettings` (settings.py) is light.
"""

from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
