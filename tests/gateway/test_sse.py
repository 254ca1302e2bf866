"""SSEParser: framing of text/event-stream bodies, however the bytes are split."""

from __future__ import annotations

from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEParser
from tests.pieces import split_at

GOLDEN = Path(__file__).parent / "golden"


def parse_all(chunks: list[bytes]) -> tuple[list[bytes], bool]:
    parser = SSEParser()
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out, parser.done


def test_llama_server_style_stream() -> None:
    body = b'data: {"a":1}\n\ndata: {"b":2}\n\n: ping\n\ndata: [DONE]\n\n'
    out, done = parse_all([body])
    assert out == [b'{"a":1}', b'{"b":2}']
    assert done


def test_crlf_and_lone_cr_line_endings() -> None:
    assert parse_all([b"data: x\r\n\r\ndata: y\r\rdata: z\n\n"])[0] == [b"x", b"y", b"z"]


def test_crlf_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [b"x"]


def test_multiline_data_joined_with_newline() -> None:
    out, _ = parse_all([b"data: line1\ndata: line2\ndata\n\n"])
    assert out == [b"line1\nline2\n"]


def test_comments_and_other_fields_ignored() -> None:
    body = b': comment\nevent: message\nid: 7\nretry: 10\nerror: {}\ndata:{"x":1}\n\n'
    assert parse_all([body])[0] == [b'{"x":1}']


def test_only_one_leading_space_is_stripped() -> None:
    assert parse_all([b"data:  two\n\n"])[0] == [b" two"]


def test_event_without_data_is_not_dispatched() -> None:
    assert parse_all([b"event: x\n\n\n\ndata: y\n\n"])[0] == [b"y"]


def test_incomplete_event_waits_then_flush_hands_it_over() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: partial") == []
    assert parser.feed(b"\n") == []  # no blank line yet
    assert parser.flush() == [b"partial"]


def test_done_is_not_returned_and_sets_flag() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\n") == []
    assert not parser.done
    assert parser.feed(b"\n") == []
    assert parser.done


def test_bom_at_stream_start_is_skipped_even_when_split() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb\xbfdata: a\n\n") == [b"a"]


def test_memoryview_and_bytearray_input() -> None:
    parser = SSEParser()
    assert parser.feed(memoryview(b"data: a\n")) == []
    assert parser.feed(bytearray(b"\n")) == [b"a"]


# Bytes that exercise every branch: line ends, colons, spaces, the [DONE] marker, a BOM.
_alphabet = st.sampled_from(
    [
        b"data",
        b":",
        b" ",
        b"\n",
        b"\r",
        b"\r\n",
        b"x",
        b"{}",
        b"[DONE]",
        b"event",
        b"\xef\xbb\xbf",
        b"\xc3\xa9",
    ]
)
_streams = st.lists(_alphabet, max_size=60).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(data=_streams, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_parses_like_the_whole(data: bytes, cuts: list[int]) -> None:
    whole = SSEParser()
    expected = whole.feed(data) + whole.flush()
    split = SSEParser()
    got: list[bytes] = []
    for piece in split_at(data, cuts):
        got.extend(split.feed(piece))
    got.extend(split.flush())
    assert got == expected
    assert split.done == whole.done


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    crlf=st.booleans(),
)
def test_round_trip_of_written_events(payloads: list[str], cuts: list[int], crlf: bool) -> None:
    eol = "\r\n" if crlf else "\n"
    body = "".join(f"data: {p}{eol}{eol}" for p in payloads) + f"data: [DONE]{eol}{eol}"
    out, done = parse_all(split_at(body.encode(), cuts))
    assert out == [p.encode() for p in payloads if p != "[DONE]"]
    assert done


def test_recorded_llama_server_streams_one_byte_at_a_time() -> None:
    for name in ("chat_stream.txt", "completions_stream.txt"):
        raw = (GOLDEN / name).read_bytes()
        whole, done_whole = parse_all([raw])
        bytewise, done_bytewise = parse_all([raw[i : i + 1] for i in range(len(raw))])
        assert whole == bytewise and done_whole and done_bytewise
        assert all(isinstance(msgspec.json.decode(p), dict) for p in whole)


@settings(max_examples=300, deadline=None)
@given(data=_streams, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_whole_events_then_events_of_parse_like_feed(data: bytes, cuts: list[int]) -> None:
    """A reader taking whole events when it can (``whole_events``, ``events_of``) and ``feed`` otherwise gets
    the payloads ``feed`` alone gives, for any bytes split anywhere (CRs, BOMs, comments, [DONE])."""
    whole = SSEParser()
    expected = whole.feed(data) + whole.flush()
    split = SSEParser()
    got: list[bytes] = []
    for piece in split_at(data, cuts):
        taken = split.whole_events(piece)
        if taken is None:
            got.extend(split.feed(piece))
        elif taken:
            assert taken.endswith(b"\n\n")
            got.extend(split.events_of(taken))
    got.extend(split.flush())
    assert got == expected
    assert split.done == whole.done
