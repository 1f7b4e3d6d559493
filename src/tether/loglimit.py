"""Rate limits for log lines about peers: a flood of bad or refused connections costs a few lines, not one
each. Standard library only, no I/O; the clock is injected."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PeerLogLimit"]


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    left_out: int = 0


class PeerLogLimit:
    """At most ``lines`` log lines per ``window_s`` seconds for each peer host; a line past the limit is
    counted, and the first line of the next window says how many were left out. A fuzzer or a broken
    peer that sends bad frames on connection after connection costs one line per frame at first, then a
    few per window. At most ``max_hosts`` hosts are remembered (the oldest window is forgotten first).
    ``about`` names the lines in the "left out" note (``bad input``, ``refused connections``)."""

    def __init__(
        self,
        lines: int = 5,
        window_s: float = 10.0,
        *,
        max_hosts: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        about: str = "bad input",
    ) -> None:
        self.lines, self.window_s, self.max_hosts, self._clock = lines, window_s, max_hosts, clock
        self._logger = logger or logging.getLogger("tether.tracker")
        self._about = about
        self._hosts: dict[str, _Window] = {}

    def allow(self, host: str) -> bool:
        """True when a line about ``host`` may be logged now."""
        now = self._clock()
        window = self._hosts.get(host)
        if window is None or now - window.start >= self.window_s:
            if window is not None:
                del self._hosts[host]
                if window.left_out:
                    self._logger.warning(
                        "%d more line(s) about %s from %s were left out", window.left_out, self._about, host
                    )
            if len(self._hosts) >= self.max_hosts:
                del self._hosts[next(iter(self._hosts))]
            self._hosts[host] = window = _Window(now)
        if window.logged < self.lines:
            window.logged += 1
            return True
        window.left_out += 1
        return False
