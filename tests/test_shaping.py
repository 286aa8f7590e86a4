"""The emulated access link (splitedge.wire.shaping): its arithmetic, and real throughput over ZeroMQ."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from splitedge.lab import launch
from splitedge.wire.shaping import Link, parse_duration, parse_rate
from splitedge.wire.transport import client_socket, server_socket


def test_parse_units():
    assert parse_rate("10mbit") == 10e6
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("2.5mbps") == 2.5e6
    assert parse_rate("1e6bit") == 1e6
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1.5") == 1.5
    for bad in ("", "10mb/s", "fast", "-3mbit", "0", "10", "1e6"):  # a bare number: a forgotten unit
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


def _round_trips(link, count, size, direction):
    """``count`` request-reply exchanges through real ZeroMQ sockets, the client shaped by ``link``.

    The uplink direction sends ``size``-byte requests and gets 1-byte replies, the downlink
    direction the reverse. Returns the wall-clock seconds of the exchanges (after a warm-up).
    """
    ctx = zmq.Context.instance()
    port = launch.free_port()
    stop = threading.Event()
    t = threading.Thread(target=_echo_server, args=(ctx, port, size if direction == "downlink" else 1, stop))
    t.start()
    ep = client_socket(ctx, f"tcp://127.0.0.1:{port}", b"shaped", link=link)
    try:
        ep.send([b"warm-up"])  # connect outside the measured part
        assert ep.recv(timeout_ms=5000) is not None
        if isinstance(link.clock, FakeClock):
            link.clock.slept.clear()
        link._up_free = link._down_free = 0.0
        t0 = time.monotonic()
        for _ in range(count):
            ep.send([b"x" * (size if direction == "uplink" else 1)])
            assert ep.recv(timeout_ms=10000) is not None
        return time.monotonic() - t0
    finally:
        stop.set()
        t.join()
        ep.close()


@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_shaped_endpoint_holds_every_message_for_its_serialization_time(direction):
    """20 messages of 200 kB through real sockets over a 16 Mbit/s link: 20 waits of 0.1 s.

    The link runs on a fake clock, so what is checked is what the endpoint asks the link
    for (each message's real wire size in the right direction), not this machine's timing.
    """
    clock = FakeClock()
    size, count, rate = 200_000, 20, 16e6
    link = Link(
        up_bps=rate if direction == "uplink" else None,
        down_bps=rate if direction == "downlink" else None,
        clock=clock,
        sleep=clock.sleep,
    )
    _round_trips(link, count, size, direction)
    assert clock.slept == pytest.approx([8 * size / rate] * count)
    assert sum(clock.slept) == pytest.approx(2.0)


def test_shaped_endpoint_adds_the_latency_to_both_directions():
    clock = FakeClock()
    _round_trips(Link(latency_s=0.04, clock=clock, sleep=clock.sleep), 8, 1, "uplink")
    assert clock.slept == pytest.approx([0.04] * 16)  # one wait per send and one per receive


@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_real_link_is_never_faster_than_the_setting(direction):
    """With the real clock the waits happen: 10 x 100 kB at 16 Mbit/s take at least 0.5 s.

    Only this bound is checked; shaping only ever waits, so a slow machine cannot break it
    (the achieved rate is a benchmark figure, not a test).
    """
    size, count, rate = 100_000, 10, 16e6
    link = Link(up_bps=rate if direction == "uplink" else None, down_bps=rate if direction == "downlink" else None)
    elapsed = _round_trips(link, count, size, direction)
    assert elapsed >= 8 * size * count / rate * 0.999


def test_a_long_emulated_send_is_interruptible_and_honours_a_deadline():
    """D3: at 1 bit/s a 1000-byte message occupies the uplink for 8000 s; the sleep used to be one
    uninterruptible call. Now it stops within a poll interval of interrupt() turning true, refuses at once
    a delivery beyond the deadline, and leaves the link usable (not busy with the message never sent)."""
    import threading
    import time

    from splitedge.wire.shaping import LinkInterrupted

    stop = threading.Event()
    link = Link(up_bps=1, interrupt=stop.is_set, poll_s=0.05)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(LinkInterrupted):
        link.before_send(1000)
    assert time.monotonic() - t0 < 5, "stopped long before the 8000 s the message needs"
    clock = FakeClock()
    link = Link(up_bps=8, down_bps=8, clock=clock, sleep=clock.sleep, deadline=clock.t + 10)
    with pytest.raises(LinkInterrupted, match="after the deadline"):
        link.before_send(100)  # 100 s
    with pytest.raises(LinkInterrupted, match="after the deadline"):
        link.after_recv(100)
    assert clock.t == 100.0, "refused without waiting"
    link.before_send(5)  # 5 s: within the deadline, and the refused message did not occupy the uplink
    assert clock.t == pytest.approx(105.0)
