"""uvicorn pieces of `palikit serve`: the HTTP/1.1 connection guard and the draining server.

The guard: a connection must deliver complete request headers within `header_timeout_s` of opening
(or of the previous response), and a request's whole body within `body_timeout_s` of its headers,
else it is closed. uvicorn has an idle keep-alive timeout but neither read timeout, so a slowloris
client (a few header bytes every few seconds) or a slow upload (a few body bytes every few seconds)
would hold a socket, a worker and the memory of its partial body for as long as it likes.
`guarded_h11(header_timeout_s, body_timeout_s)` is a subclass of uvicorn's h11 protocol, passed as
`http=` to uvicorn. Header size is bounded by h11 (`h11_max_incomplete_event_size`, 16 KB by default:
past it a 400); the number of connections by uvicorn's `limit_concurrency` (past it: 503).

`DrainingServer`: on SIGTERM / Ctrl-C the app stops admitting at once (new requests: 503), the
requests already running get the shutdown timeout to finish, and those still running just before it
ends get a 503 (`EngineFront.drain`), instead of uvicorn cancelling them with no answer.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("palikit.serve")


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm_header_timer()
        else:
            self._cancel_header_timer()
        if self.conn.their_state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timeout)
        else:
            self._cancel_body_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same deadline

    # ------------------------------------------------------------------ timer
    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        timer = getattr(self, "_body_timer", None)
        if timer is not None:
            timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            log.info("closing a connection from %s: the request body did not arrive within %g s",
                     (self.client or ("?",))[0], self.body_timeout_s)
            self.transport.close()  # the app's receive() sees the disconnect: counted as an abort

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request headers within %g s",
                     (self.client or ("?",))[0], self.header_timeout_s)
            self.transport.close()


def guarded_h11(header_timeout_s: float, body_timeout_s: float = 60.0) -> type[GuardedH11Protocol]:
    """The protocol class for `uvicorn.run(..., http=...)` with these timeouts."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(header_timeout_s),
                                                              "body_timeout_s": float(body_timeout_s)})


def draining_server(config, front, shutdown_timeout_s: float):
    """A uvicorn Server that drains `front` (an `EngineFront`) when told to exit: no new requests,
    running ones end within `shutdown_timeout_s` (the last second or so kept for their 503s)."""
    import uvicorn

    margin = min(1.0, shutdown_timeout_s / 2)
    config.timeout_graceful_shutdown = shutdown_timeout_s

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            log.info("shutting down: new requests get 503; running ones have %g s to finish", shutdown_timeout_s)
            front.drain(shutdown_timeout_s - margin)
            await super().shutdown(sockets)

    return DrainingServer(config)
