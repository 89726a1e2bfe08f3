"""Plain helpers of the test suite (fixtures are in tests/conftest.py): `models` (tiny transformers
references, their checkpoints in every key layout, engine requests), `train` (training stand-ins and runs),
and `free_port` here."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
