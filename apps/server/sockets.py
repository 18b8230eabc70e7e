"""The connection limits of `edge-vlm serve`, on top of what uvicorn has.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`), the size of a request's
headers (h11's `max_incomplete_event_size`) and the requests it starts at once
(`limit_concurrency`, 503 beyond), but not how long a client may take to send its headers nor how
many sockets may be open: 200 clients trickling header bytes would each hold a socket for as long
as they like. `GuardedH11` is uvicorn's h11 protocol with both: a connection beyond
`max_connections` is closed as soon as it is accepted, and one whose request headers are not
complete `header_timeout_s` after its first byte (or after it connected) is closed. The body's
own deadline is the app's (`--body-timeout`, app.Limits).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_LIMIT_BYTES = 64 * 1024  # request line and headers together (h11's limit)


def guarded_h11(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header deadline (pass as `http=`)."""

    class GuardedH11(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.logger.warning("edge-vlm serve: %d connections open, over --max-connections: closing a new one",
                                    len(self.connections) - 1)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still reading a request's line and headers
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11
