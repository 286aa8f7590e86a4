"""The emulated access link (splitedge.shaping): its arithmetic, and real throughput over ZeroMQ."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from splitedge import launch
from splitedge.shaping import Link, parse_duration, parse_rate
from splitedge.transport import client_socket, server_socket


def test_parse_units():
    assert parse_rate("10mbit") == 10e6
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("2.5mbps") == 2.5e6
    assert parse_rate("1e6") == 1e6
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1.5") == 1.5
    for bad in ("", "10mb/s", "fast", "-3mbit", "0"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        parse_duration("3 days")


class FakeClock:
    def __init__(self):
        self.t = 100.0
        self.slept = []

    def __call__(self):
        return self.t

    def sleep(self, d):
        self.slept.append(d)
        self.t += d


def test_link_arithmetic_queues_and_adds_latency():
    clock = FakeClock()
    link = Link(up_bps=8e6, down_bps=4e6, latency_s=0.01, clock=clock, sleep=clock.sleep)
    link.before_send(1_000_000)  # 1 MB at 8 Mbit/s = 1 s, + 10 ms
    assert clock.t == pytest.approx(101.01)
    # the uplink was free again at 101.0; a second message starts now (101.01): 0.5 s + 10 ms
    link.before_send(500_000)
    assert clock.t == pytest.approx(101.52)
    link.after_recv(500_000)  # 1 s at 4 Mbit/s + 10 ms
    assert clock.t == pytest.approx(102.53)
    # a reply that was sent while the downlink was still busy queues behind the previous one
    link.after_recv(250_000, sent_at=102.0)
    assert clock.t == pytest.approx(102.52 + 0.5 + 0.01)
    assert not Link().active and Link(latency_s=0.001).active


def _echo_server(ctx, port, reply_size, stop):
    ep = server_socket(ctx, f"tcp://127.0.0.1:{port}")
    try:
        while not stop.is_set():
            got = ep.recv(timeout_ms=50)
            if got is None:
                continue
            ident, _ = got
            ep.send([b"r" * reply_size], ident)
    finally:
        ep.close()


@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_measured_throughput_matches_the_setting(direction):
    """20 messages of 200 kB over a 16 Mbit/s link: 2.0 s of serialization.

    Tolerance: the measured rate lies within [0.8, 1.0] of the setting. Shaping only ever
    waits, so the rate cannot exceed the setting; the lower bound leaves 25 % for the
    machine's noise (ZeroMQ itself moves 200 kB in well under a millisecond here).
    """
    ctx = zmq.Context.instance()
    port = launch.free_port()
    size, count, rate = 200_000, 20, 16e6
    stop = threading.Event()
    t = threading.Thread(target=_echo_server, args=(ctx, port, size if direction == "downlink" else 1, stop))
    t.start()
    link = Link(up_bps=rate if direction == "uplink" else None, down_bps=rate if direction == "downlink" else None)
    ep = client_socket(ctx, f"tcp://127.0.0.1:{port}", b"shaped", link=link)
    try:
        ep.send([b"warm-up"])  # connect outside the timed part
        assert ep.recv(timeout_ms=5000) is not None
        link._up_free = link._down_free = 0.0
        t0 = time.monotonic()
        for _ in range(count):
            ep.send([b"x" * (size if direction == "uplink" else 1)])
            assert ep.recv(timeout_ms=10000) is not None
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        ep.close()
    measured = 8 * size * count / elapsed
    assert 0.8 * rate <= measured <= rate * 1.001, f"measured {measured / 1e6:.2f} Mbit/s for a {rate / 1e6:g} Mbit/s link"


def test_measured_latency_matches_the_setting():
    """Small request-reply over a 40 ms one-way link: 80 ms round trips (tolerance +25 %)."""
    ctx = zmq.Context.instance()
    port = launch.free_port()
    stop = threading.Event()
    t = threading.Thread(target=_echo_server, args=(ctx, port, 1, stop))
    t.start()
    ep = client_socket(ctx, f"tcp://127.0.0.1:{port}", b"lat", link=Link(latency_s=0.04))
    try:
        rtts = []
        for _ in range(8):
            t0 = time.monotonic()
            ep.send([b"p"])
            assert ep.recv(timeout_ms=5000) is not None
            rtts.append(time.monotonic() - t0)
    finally:
        stop.set()
        t.join()
        ep.close()
    med = sorted(rtts)[len(rtts) // 2]
    assert 0.08 <= med <= 0.1, rtts
