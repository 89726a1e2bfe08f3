"""The HTTP/1.1 connection guard under uvicorn: a connection must deliver complete request headers
within `header_timeout_s` of opening (or of the previous response), else it is closed. uvicorn has
an idle keep-alive timeout but no header-read timeout, so a slowloris client (a few header bytes
every few seconds) or a connection that sends nothing would hold a socket and a slot forever.

`guarded_h11(header_timeout_s)` is a subclass of uvicorn's h11 protocol, passed as `http=` to uvicorn.
Header size is bounded by h11 (`h11_max_incomplete_event_size`, 16 KB by default: past it a 400).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("palikit.serve")


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
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

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request headers within %g s",
                     (self.client or ("?",))[0], self.header_timeout_s)
            self.transport.close()


def guarded_h11(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for `uvicorn.run(..., http=...)` with this header timeout."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
