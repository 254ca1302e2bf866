"""One codec per union, reused. Internal traffic is msgpack; public events are JSON (any language reads them).

Decoding never raises anything but ``BusDecodeError``: a receiver logs it and drops the frame.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from bus.protocol import Command, Event, Job, Reply, StreamItem

T = TypeVar("T")


class BusDecodeError(ValueError):
    """A frame that is not a valid message of the expected union."""


class Codec(Generic[T]):
    def __init__(self, kind: Any, *, json: bool = False) -> None:
        if json:
            self._enc: Any = msgspec.json.Encoder()
            self._dec: Any = msgspec.json.Decoder(kind)
        else:
            self._enc = msgspec.msgpack.Encoder()
            self._dec = msgspec.msgpack.Decoder(kind)

    def encode(self, msg: T) -> bytes:
        return self._enc.encode(msg)

    def decode(self, frame: bytes | memoryview) -> T:
        try:
            return self._dec.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BusDecodeError(str(exc)) from None
        except Exception as exc:  # msgspec raises only the above, but a frame must never crash us
            raise BusDecodeError(f"{type(exc).__name__}: {exc}") from None


COMMANDS: Codec[Command] = Codec(Command)
REPLIES: Codec[Reply] = Codec(Reply)
JOBS: Codec[Job] = Codec(Job)
STREAM: Codec[list[StreamItem]] = Codec(list[StreamItem])  # a frame: the items of one loop tick (bus/pump.py)
EVENTS: Codec[Event] = Codec(Event, json=True)


def encode_event(topic: str, event: Event) -> list[bytes]:
    """The two frames of a published event: topic, JSON body."""
    return [topic.encode(), EVENTS.encode(event)]
