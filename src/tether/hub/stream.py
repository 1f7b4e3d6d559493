"""The tracker's events fanned out to server-sent-event streams (``/api/v1/events``).

:meth:`EventStreams.on_event` (the bus subscriber, on the tracker's loop) encodes each event once, as the
bytes of one SSE message (``data: {json}\\n\\n``), and puts it on every open stream's queue without
waiting. Bounds: at most ``max_streams`` streams at once (:meth:`open` returns None past it); each queue
holds at most ``queue_size`` messages, and a stream whose reader falls that far behind is dropped (its
queue emptied, a final message saying so queued): the tracker never waits on a reader and never buffers
for one without limit.

Events pass through as :meth:`~tether.tracker.events.TrackerEvent.as_dict` writes them, less their
``matchkey`` (a secret: whoever knows it can take the granted server's session).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Final

from ..tracker.events import TrackerEvent

__all__ = ["DROPPED", "EventStreams", "Stream", "encode_event"]

logger = logging.getLogger("tether.hub")

#: Fields never sent to a stream.
_SECRET_FIELDS: Final = frozenset({"matchkey"})
#: The last message of a stream dropped for being too slow; its reader reconnects and re-reads the state.
DROPPED: Final = (
    b'event: dropped\ndata: {"error": "too_slow", "message": "this stream fell behind and was dropped"}\n\n'
)
_dumps = json.JSONEncoder(ensure_ascii=False, default=str).encode


def encode_event(event: TrackerEvent) -> bytes:
    """One SSE message for ``event``: ``data: {json}`` and a blank line (JSON text has no newlines)."""
    data = {k: v for k, v in event.as_dict().items() if k not in _SECRET_FIELDS}
    return b"data: " + _dumps(data).encode() + b"\n\n"


class Stream:
    """One reader's queue of encoded messages. ``None`` on the queue means: end the stream."""

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(queue_size + 1)  # +1: room for the ending
        self._room = queue_size
        self.dropped = False
        self.closed = False

    def put(self, message: bytes) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self._room:
            self.dropped = True
            self._finish(DROPPED)
            return
        self.queue.put_nowait(message)

    def close(self) -> None:
        """End the stream (its handler returns once it reads the end)."""
        if not self.closed:
            self._finish(None)

    def _finish(self, last: bytes | None) -> None:
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        if last is not None:
            self.queue.put_nowait(last)
        self.queue.put_nowait(None)


class EventStreams:
    """The open streams, fed by :meth:`on_event`. Use from the tracker's loop only."""

    def __init__(self, max_streams: int = 64, queue_size: int = 256) -> None:
        self.max_streams = max_streams
        self.queue_size = queue_size
        self._streams: set[Stream] = set()
        #: streams dropped for falling behind, since the start
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._streams)

    def open(self) -> Stream | None:
        """A new stream, or None when ``max_streams`` are open."""
        if len(self._streams) >= self.max_streams:
            return None
        stream = Stream(self.queue_size)
        self._streams.add(stream)
        return stream

    def discard(self, stream: Stream) -> None:
        """``stream``'s reader is gone."""
        self._streams.discard(stream)
        stream.close()

    def on_event(self, event: TrackerEvent) -> None:
        if not self._streams:
            return
        message = encode_event(event)
        for stream in list(self._streams):
            stream.put(message)
            if stream.dropped:
                self._streams.discard(stream)
                self.dropped += 1
                logger.info("an event stream fell %d events behind: dropped", self.queue_size)

    def close_all(self) -> None:
        for stream in list(self._streams):
            self.discard(stream)
