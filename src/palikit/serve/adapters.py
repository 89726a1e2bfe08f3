"""The server's multi-LoRA side (issue 34), over `PaliGemma.load_adapter` and the engine's slots:

- `"adapter": NAME` on every task endpoint (the request `Options`), chat `model: NAME` when NAME is a
  loaded adapter (`chat_adapter`); no name = the base model. An unknown adapter answers 404 listing
  the loaded ones (`errors.api_error` maps the engine's `UnknownAdapter`); a bad adapter file, a rank
  over --max-lora-rank or another base model's adapter answers 400 (`AdapterError`, a ValueError).
- `GET /v1/models` lists the base model and the adapters (`served_models`).
- `POST /v1/adapters {"name", "path"}` loads one at runtime, `DELETE /v1/adapters/{name}` unloads it
  (requests in flight finish first). Both need the API key when keys are set (the middleware protects
  every /v1 path), and a path must lie under --adapter-dir (off without it: 403).
- /metrics: requests per adapter, the adapters on the device and on the CPU (`observe_adapters`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError, bad_request


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                      description="The name requests use (`adapter`, chat `model`).")
    path: str = Field(..., min_length=1, max_length=1024, description="A PEFT adapter folder under --adapter-dir "
                      "(relative to it, or absolute inside it).")


def engine_adapters(state):
    engine = getattr(state.pg, "engine", None)
    return None if engine is None else engine.adapters


def served_models(state) -> list[dict[str, Any]]:
    """`/v1/models` entries: the base model, then each loaded adapter (`parent`: the base)."""
    entry = {"object": "model", "created": 0, "owned_by": "palikit"}
    base, *adapters = state.served_names()
    return [{"id": base, **entry}] + [{"id": n, "parent": base, **entry} for n in adapters]


def chat_adapter(state, model: str | None) -> str | None:
    """The adapter a chat request's `model` names, or None (the base model, whatever else it says)."""
    return model if model and model in getattr(state.pg, "adapters", []) else None


def resolve_path(settings, path: str) -> Path:
    """A client-named adapter folder, only under --adapter-dir (no `..` or link escapes)."""
    if not settings.adapter_dir:
        raise ApiError(403, "forbidden", "loading adapters at runtime is off: start the server with --adapter-dir DIR "
                       "(paths are accepted under DIR only).")
    root = Path(settings.adapter_dir).resolve()
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise bad_request("path must lie under the server's --adapter-dir.", "path")
    if not full.is_dir():
        raise ApiError(404, "not_found", f"no adapter folder {path[:200]!r} under --adapter-dir.")
    return full


def add_adapter_routes(app, state) -> None:
    from .schemas import parse_model

    @app.post("/v1/adapters", tags=["adapters"], summary="Load a LoRA adapter (PEFT folder under --adapter-dir).")
    async def load_adapter(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("the request body must be JSON: {\"name\": ..., \"path\": ...}.") from None
        req = parse_model(LoadAdapter, body, strict=True)
        folder = resolve_path(state.settings, req.path)
        await anyio.to_thread.run_sync(state.pg.load_adapter, req.name, folder)
        return {"object": "adapter", "id": req.name, "loaded": True}

    @app.delete("/v1/adapters/{name}", tags=["adapters"], summary="Unload a LoRA adapter (in-flight requests "
                "finish first).")
    async def unload_adapter(name: str):
        state.pg.unload_adapter(name)
        return {"object": "adapter", "id": name, "deleted": True}


class AdapterGauges:
    """/metrics: `palikit_adapter_requests{adapter}` (finished requests), `palikit_adapter_resident{adapter,
    tier}` (1 when on the device / on the CPU), `palikit_lora_slots` (device slots)."""

    def __init__(self, registry):
        from prometheus_client import Gauge

        self.requests = Gauge("palikit_adapter_requests", "Finished requests per LoRA adapter.", ["adapter"],
                              registry=registry)
        self.resident = Gauge("palikit_adapter_resident", "LoRA adapters resident on the device / in CPU memory.",
                              ["adapter", "tier"], registry=registry)
        self.slots = Gauge("palikit_lora_slots", "Device slots for LoRA adapters (max_loras).", registry=registry)

    def observe(self, stats: dict | None) -> None:
        if stats is None:
            return
        self.slots.set(stats["max_loras"])
        for name, n in stats["requests"].items():
            self.requests.labels(name).set(n)
        self.resident.clear()
        for tier, key in (("device", "on_device"), ("cpu", "on_cpu")):
            for name in stats[key]:
                self.resident.labels(name, tier).set(1)
