"""bus/pump.py: a ROUTER's Outbox sends one frame per gateway per loop tick; a gateway whose queue is full (HWM)
gets the rest later, in order; a gone gateway is reported once. The Reader drains a socket from the loop's
reader callback."""

from __future__ import annotations

import asyncio
import tempfile
import time

import pytest
import zmq
import zmq.asyncio

from bus.codec import STREAM
from bus.protocol import Data, End
from bus.pump import Outbox, Reader, readable, recv_frames, send_frames


def test_outbox_batches_per_tick_keeps_order_past_the_hwm_and_reports_gone() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        path = f"ipc://{tempfile.mkdtemp()}/w.sock"
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.sndhwm = 2
        router.linger = 0
        router.bind(path)
        dealer = ctx.socket(zmq.DEALER)
        dealer.rcvhwm = 2
        dealer.linger = 0
        dealer.connect(path)
        got: list[list[object]] = []
        gone: list[bytes] = []
        dealer.send(b"hello")  # the router learns the dealer's identity
        ident = (await router.recv_multipart())[0]
        outbox = Outbox(router, gone.append)
        try:
            # two items in one tick: one frame
            assert outbox.put(ident, Data(request_id="r", data=b"a")) and outbox.put(ident, End(request_id="r"))
            await asyncio.sleep(0)
            frames = await dealer.recv_multipart()
            assert len(frames) == 1 and STREAM.decode(frames[0]) == [Data(request_id="r", data=b"a"),
                                                                      End(request_id="r")]
            # many ticks while the dealer does not read: the queue fills, later frames wait and keep their order
            n = 3000
            for i in range(n):
                outbox.put(ident, Data(request_id="r", data=b"%d" % i))
                await asyncio.sleep(0)
            assert outbox.blocked, "the HWM was reached (the test exercises the retry path)"
            reader_done = asyncio.get_running_loop().create_future()

            def on_message(msg: list[zmq.Frame]) -> None:
                got.extend(STREAM.decode(msg[0].buffer))
                if len(got) == n and not reader_done.done():
                    reader_done.set_result(None)

            reader = Reader(dealer, on_message)
            await asyncio.wait_for(reader_done, 20)
            reader.close()
            assert [item.data for item in got] == [b"%d" % i for i in range(n)]  # type: ignore[attr-defined]
            # a gateway that is gone: put says so (once known), on_gone is called once
            assert outbox.put(b"\x00nobody", End(request_id="x"))
            outbox.flush()
            assert gone == [b"\x00nobody"]
            assert not outbox.put(b"\x00nobody", End(request_id="y"))
            outbox.flush()
            assert gone == [b"\x00nobody"]
        finally:
            router.close(0)
            dealer.close(0)
            ctx.term()

    asyncio.run(main())


def test_send_frames_and_recv_frames_keep_a_message_whole_and_refuse_a_full_queue() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.sndhwm = b.rcvhwm = 1
    a.linger = b.linger = 0
    path = f"ipc://{tempfile.mkdtemp()}/p.sock"
    b.bind(path)
    a.connect(path)
    try:
        with pytest.raises(zmq.Again):
            recv_frames(b)  # nothing waiting: never blocks
        assert not readable(b)
        send_frames(a, [b"one", b"", b"three" * 1000])
        for _ in range(200):
            if readable(b):
                break
            time.sleep(0.005)
        assert [f.bytes for f in recv_frames(b)] == [b"one", b"", b"three" * 1000]
        # nobody reads: the queues fill and a send is refused (zmq.Again), never blocks; (the first send may wait
        # for the queue's credit from the read above)
        sent = 0
        deadline = time.monotonic() + 5
        while True:
            try:
                send_frames(a, [b"x", b"y"])
                sent += 1
            except zmq.Again:
                if sent or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        assert 0 < sent < 10_000
        got: list[list[bytes]] = []
        while len(got) < sent and time.monotonic() < deadline:
            try:
                got.append([f.bytes for f in recv_frames(b)])
            except zmq.Again:
                time.sleep(0.005)
        assert got == [[b"x", b"y"]] * sent  # every accepted message arrives whole
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
