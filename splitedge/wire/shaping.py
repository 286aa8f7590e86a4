"""An emulated edge access link: rate-limited uplink and downlink plus one-way latency.

Edge networks are slow where the edge is: the board's uplink (Wi-Fi, LTE, a shared
10 Mbit/s line), not the cloud's data-centre link. ``edge-train --bandwidth 10mbit
--latency 20ms`` shapes that link inside the edge's transport, so time-to-accuracy
means what it means on such a network, on one machine, without root or ``tc``.

How it works (a store-and-forward link per direction, on the edge's side):

* uplink: a message of ``n`` bytes occupies the uplink for ``8 n / up_rate`` seconds,
  starting when the uplink is free (messages queue behind each other). It reaches
  the cloud ``latency`` after its last bit left. The edge holds the message and hands
  it to ZeroMQ at that moment, so the cloud receives it when a real link would have
  delivered it.
* downlink: a reply of ``m`` bytes that the cloud sent at time ``t`` (when ZeroMQ
  delivered it over loopback) starts on the downlink at ``max(t, downlink free)``,
  takes ``8 m / down_rate`` seconds and arrives ``latency`` later; the edge does not
  look at it before then.

Request-reply traffic (every message of this protocol) therefore sees exactly
``up serialization + latency + cloud time + down serialization + latency`` per step.
Byte counts are the ZeroMQ frames (header + payloads); TCP/IP overhead is not
emulated. Rates are in bits per second, as ``tc`` writes them: ``10mbit``, ``500kbit``,
``1gbit``, ``2.5mbps`` (bits), or a plain number of bit/s.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from collections.abc import Callable

_RATE_UNITS = {
    "bit": 1, "bps": 1, "kbit": 1e3, "kbps": 1e3, "mbit": 1e6, "mbps": 1e6, "gbit": 1e9, "gbps": 1e9,
}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_rate(text: str) -> float:
    """``10mbit`` -> 1e7 bit/s. Raises ValueError naming the accepted units.

    The unit is required: a bare ``10`` (10 bit/s, a link that would take hours per step) is
    almost always a forgotten ``mbit``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"bad rate {text!r}: write a number and one of {', '.join(_RATE_UNITS)} (e.g. 10mbit)")
    value = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"bad rate {text!r}: must be positive")
    return value


def parse_duration(text: str) -> float:
    """``20ms`` -> 0.02 s. A plain number is seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
    if not m or (m.group(2) and m.group(2) not in _TIME_UNITS):
        raise ValueError(f"bad duration {text!r}: write a number and one of {', '.join(_TIME_UNITS)} (e.g. 20ms)")
    return float(m.group(1)) * _TIME_UNITS.get(m.group(2) or "s", 1.0)


class LinkInterrupted(Exception):
    """A wait on the emulated link was cut short: ``interrupt()`` said so, or the message would arrive
    after ``deadline``. The message was not sent (or the received one is dropped)."""


@dataclass
class Link:
    """Shaping state of one edge's link. ``None`` rates mean unlimited.

    A wait (a message's serialization time plus the latency, hours for a large message at ``1bit``)
    sleeps in slices of at most ``poll_s``, asking ``interrupt()`` between them (e.g. "was SIGTERM
    received?"), and is refused at once if it would end after ``deadline`` (a monotonic time, e.g.
    the request's --give-up): :class:`LinkInterrupted` either way."""

    up_bps: float | None = None
    down_bps: float | None = None
    latency_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    interrupt: Callable[[], bool] | None = None
    deadline: float | None = None
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive or None, got {v}")
        if self.latency_s < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency_s}")
        self._up_free = 0.0
        self._down_free = 0.0

    @property
    def active(self) -> bool:
        return self.up_bps is not None or self.down_bps is not None or self.latency_s > 0

    def _wait_until(self, t: float) -> None:
        if self.deadline is not None and t > self.deadline and t > self.clock():
            raise LinkInterrupted(f"the emulated link would deliver it {t - self.clock():.3g}s from now, after the "
                                  "deadline")
        while (delay := t - self.clock()) > 0:
            if self.interrupt is not None and self.interrupt():
                raise LinkInterrupted("interrupted")
            self.sleep(min(delay, self.poll_s) if self.interrupt is not None else delay)

    def before_send(self, nbytes: int) -> None:
        """Blocks until a message of ``nbytes`` sent now would have reached the cloud."""
        now = self.clock()
        start = max(now, self._up_free)
        done = start + (8.0 * nbytes / self.up_bps if self.up_bps else 0.0)
        saved, self._up_free = self._up_free, done
        try:
            self._wait_until(done + self.latency_s)
        except LinkInterrupted:
            self._up_free = max(saved, min(done, self.clock()))  # not sent: the uplink is free from now on
            raise

    def after_recv(self, nbytes: int, sent_at: float | None = None) -> None:
        """Blocks until a message of ``nbytes`` the cloud sent at ``sent_at`` (default: now) arrives."""
        t = self.clock() if sent_at is None else sent_at
        start = max(t, self._down_free)
        done = start + (8.0 * nbytes / self.down_bps if self.down_bps else 0.0)
        saved, self._down_free = self._down_free, done
        try:
            self._wait_until(done + self.latency_s)
        except LinkInterrupted:
            self._down_free = max(saved, min(done, self.clock()))
            raise

    def describe(self) -> str:
        def r(v: float | None) -> str:
            if v is None:
                return "unlimited"
            for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
                if v >= scale:
                    return f"{v / scale:g}{unit}"
            return f"{v:g}bit"

        return f"uplink {r(self.up_bps)}, downlink {r(self.down_bps)}, latency {self.latency_s * 1000:g} ms"
