"""`ServerSettings`: every setting of the HTTP server and its default, in one place (`palikit serve`'s
flags take their defaults from here; `create_app` and Ray Serve take an instance). No heavy import:
the CLI reads it at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Everything `create_app` needs besides the model; `palikit serve` flags map one-to-one."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()           # Bearer keys; empty = no auth (fine on loopback only)
    max_slots: int = 16                      # engine slots: requests decoding together (continuous batching)
    max_queue: int = 256                     # requests waiting for a slot beyond which new ones get 503
    request_timeout_s: float = 60.0          # queue wait + generation; past it: 504
    max_upload_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding
    max_image_pixels: int = 40_000_000       # width * height read from the header, before decoding
    max_aspect_ratio: float = 100.0          # longer side / shorter side, from the header
    decode_budget_bytes: int = 192 * 2**20    # bytes image decoding holds, all requests together (images.decode_cost)
    decode_wait_s: float = 1.0               # wait for that budget at most this long, then 429 + Retry-After
    max_json_depth: int = 32                 # nesting of a JSON body (deeper: 400)
    max_labels: int = 64                     # labels per request, every endpoint
    allowed_hosts: tuple[str, ...] | None = None  # Host header names served (None: any; see default_allowed_hosts)
    header_timeout_s: float = 10.0           # a connection must send complete request headers within this
    keep_alive_s: int = 5                    # idle keep-alive connections are closed after this
    body_timeout_s: float = 60.0             # a request's body must arrive within this of its headers
    max_connections: int = 512               # open connections + requests at once (uvicorn's limit_concurrency)
    shutdown_timeout_s: float = 30.0         # SIGTERM: running requests get this long, then 503
    protect_docs: bool = False               # docs, schema, playground and /readyz need the API key too
    max_images_per_request: int = 8          # frames of one example (chat messages with several images)
    max_prompt_chars: int = 2000
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 64
    max_num_beams: int = 4
    warmup: bool = True                      # one tiny prediction before /readyz says ready
    adapter_dir: str | None = None           # POST /v1/adapters loads folders under this only (None: off)
    served_name: str | None = None           # the model name clients see and send (None: the model's own)
    access_log: bool = True                  # one line per request (logger palikit.access)

    @property
    def max_body_bytes(self) -> int:
        """A request body to a /v1/ endpoint: one image's worth as base64 (4/3 larger) plus the JSON
        around it; the frames of one chat request share it. Refused from Content-Length before reading,
        else counted while reading."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024

    def body_limit(self, path: str) -> int:
        """Bytes a request body to `path` may have (applied while reading)."""
        return self.max_body_bytes if path.startswith("/v1/") else 64 * 1024

    def host_allowlist(self) -> tuple[str, ...] | None:
        """Names the Host header may carry (lower case, no port); None = any."""
        if self.allowed_hosts is None:
            return None
        names = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        return None if "*" in names else names

    @staticmethod
    def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
        """What `palikit serve` allows without --allowed-hosts: the loopback names on a loopback bind (a
        web page's DNS-rebinding request carries its own name), any name otherwise (use API keys). The
        bound address itself is one of them (127.0.0.2, or any 127.0.0.0/8 address, is loopback too)."""
        if not is_loopback(host):
            return None
        own = host.strip().strip("[]").lower()
        return tuple(dict.fromkeys(("localhost", "127.0.0.1", "::1", own)))

    @staticmethod
    def keys_from_env(value: str | None = None) -> tuple[str, ...]:
        raw = os.environ.get("PALIKIT_API_KEYS", "") if value is None else value
        return tuple(k.strip() for k in raw.split(",") if k.strip())


CHECKPOINT_FOLDERS = ("final", "last", "best", "checkpoints")  # folder names a trainer writes inside a run


def default_served_name(model: str | None, fallback: str) -> str:
    """The name a model is served under when --name is not given: the run's name for a trainer's
    output (runs/shapes/final -> "shapes", runs/shapes/checkpoints/step-00000100 -> "shapes"), else
    the folder's; "demo" for the bundled demo model (as `--model demo` names it); `fallback`, the
    model's own name, for a Hub id."""
    from pathlib import Path

    from ..assets import means_demo

    if means_demo(model):
        return "demo"
    path = Path(model)
    if not path.exists():
        return fallback
    parts = [p for p in path.resolve().parts if p not in ("", "/")]
    while parts and (parts[-1] in CHECKPOINT_FOLDERS or parts[-1].startswith("step-")):
        parts.pop()
    return parts[-1] if parts else fallback


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
