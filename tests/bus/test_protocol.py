"""Every bus message round-trips through its codec; random frames never raise anything but BusDecodeError."""

from __future__ import annotations

import gc
import types
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import codec, protocol
from bus.codec import BusDecodeError

UNIONS = {
    codec.COMMANDS: protocol.Command,
    codec.REPLIES: protocol.Reply,
    codec.JOBS: protocol.Job,
    codec.STREAM: protocol.StreamItem,
    codec.EVENTS: protocol.Event,
}

finite = st.floats(allow_nan=False, allow_infinity=False)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _strategy(tp: typing.Any) -> st.SearchStrategy[typing.Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _strategy(a) for a in typing.get_args(tp)])
    if tp is float:
        return finite
    if tp is int:
        return i64
    if origin is list:
        (arg,) = typing.get_args(tp)
        return st.lists(_strategy(arg), max_size=3)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    return st.from_type(tp)


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[typing.Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: _strategy(hints[f.name]) for f in msgspec.structs.fields(cls)})


def _members(union: typing.Any) -> list[type[msgspec.Struct]]:
    return list(typing.get_args(union))


CASES = [(c, m) for c, u in UNIONS.items() for m in _members(u)]


@pytest.mark.parametrize(("codec_", "cls"), CASES, ids=[m.__name__ for _, m in CASES])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(codec_: codec.Codec[typing.Any], cls: type[msgspec.Struct], data: st.DataObject) -> None:
    msg = data.draw(struct_strategy(cls))
    if codec_ is codec.STREAM:  # a stream frame carries a batch: the items of one loop tick
        got = codec_.decode(codec_.encode([msg, msg]))
        assert got == [msg, msg]
        got = got[0]
    else:
        got = codec_.decode(codec_.encode(msg))
        assert got == msg
    # plain data, out of the cyclic collector's sight: a stream's thousands of items never set it off
    assert not gc.is_tracked(got)


def test_every_message_is_in_a_union() -> None:
    in_unions = {m for u in UNIONS.values() for m in _members(u)}
    tagged = {
        obj for obj in vars(protocol).values()
        if isinstance(obj, type) and issubclass(obj, protocol._Msg) and obj is not protocol._Msg
    }
    assert tagged == in_unions


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=200))
def test_random_frames_only_raise_decode_error(frame: bytes) -> None:
    for c in UNIONS:
        try:
            c.decode(frame)
        except BusDecodeError:
            pass


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["type", "request_id", "path", "body", "status", "name", "state"]),
                           st.one_of(st.none(), i64, st.text(max_size=5), st.binary(max_size=5))))
def test_wrong_shapes_only_raise_decode_error(doc: dict[str, typing.Any]) -> None:
    frame = msgspec.msgpack.encode(doc)
    for c in (codec.COMMANDS, codec.JOBS, codec.STREAM, codec.REPLIES):
        try:
            c.decode(frame)
        except BusDecodeError:
            pass


def test_unknown_fields_are_tolerated() -> None:
    raw = msgspec.json.encode({"type": "worker_state", "name": "m", "state": "ready", "future_field": 1})
    event = codec.EVENTS.decode(raw)
    assert isinstance(event, protocol.WorkerStateEvent) and event.name == "m"


def test_unknown_tag_is_a_decode_error() -> None:
    with pytest.raises(BusDecodeError):
        codec.JOBS.decode(msgspec.msgpack.encode({"type": "nope", "request_id": "x"}))


ANY_VALUE = st.one_of(st.none(), st.booleans(), i64, st.floats(), st.text(max_size=8), st.binary(max_size=8),
                      st.lists(i64, max_size=2), st.dictionaries(st.text(max_size=3), i64,
                                                                            max_size=2))


@pytest.mark.parametrize(("codec_", "cls"), CASES, ids=[m.__name__ for _, m in CASES])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_valid_message_with_one_field_changed_decodes_or_raises_decode_error(
        codec_: codec.Codec[typing.Any], cls: type[msgspec.Struct], data: st.DataObject) -> None:
    """Structurally valid frames that are wrong: one field of a real message replaced by any value, or a real
    message of one union fed to another union's decoder. Either a valid message or BusDecodeError, never more."""
    msg = data.draw(struct_strategy(cls))
    doc = msgspec.to_builtins(msg)
    field = data.draw(st.sampled_from([*doc.keys(), "unknown_field"]))
    doc[field] = data.draw(ANY_VALUE)
    frames = [msgspec.msgpack.encode(doc), msgspec.json.encode(doc), codec_.encode(msg)]
    for c in UNIONS:
        for frame in frames:
            try:
                out = c.decode(frame)
            except BusDecodeError:
                continue
            assert isinstance(out, msgspec.Struct)
