"""Self-hosted HTTP server for PaliGemma: task endpoints with structured results, an
OpenAI-compatible chat endpoint, micro-batching, Prometheus metrics and a browser playground.

    from palikit.serve import create_app, ServerSettings
    app = create_app(PaliGemma.from_pretrained(...), ServerSettings(api_keys=("secret",)))

Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus-client); imported lazily.
"""

from __future__ import annotations

from .app import create_app
from .schemas import ServerSettings

__all__ = ["ServerSettings", "create_app"]
