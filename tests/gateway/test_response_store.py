"""The Responses API's store: what ``previous_response_id`` finds, and its bounds (count, age, bytes)."""

from __future__ import annotations

import time

import pytest

from gateway.errors import ApiError
from gateway.response_store import ResponseStore, input_items


def _put(store: ResponseStore, rid: str, text: str = "x") -> None:
    store.put(rid, [{"role": "user", "content": text}], {"id": rid, "object": "response"})


def test_a_stored_conversation_comes_back_as_it_was_put_and_a_later_change_does_not_reach_it() -> None:
    store = ResponseStore()
    conversation = input_items("Hi") + [{"type": "message", "role": "assistant", "content": []}]
    store.put("resp_1", conversation, {"id": "resp_1", "output": []})
    conversation.append({"changed": True})
    assert store.conversation("resp_1") == input_items("Hi") + [{"type": "message", "role": "assistant",
                                                                 "content": []}]
    assert store.response("resp_1") == {"id": "resp_1", "output": []}


def test_unknown_ids_are_openais_errors() -> None:
    store = ResponseStore()
    with pytest.raises(ApiError) as err:
        store.conversation("resp_nope")
    assert (err.value.status, err.value.code, err.value.param) == (400, "previous_response_not_found",
                                                                   "previous_response_id")
    assert "resp_nope" in err.value.message
    with pytest.raises(ApiError) as err:
        store.response("resp_nope")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        store.delete("resp_nope")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        store.conversation("")
    assert err.value.status == 400


def test_the_newest_entries_are_kept_and_a_use_makes_an_entry_new() -> None:
    store = ResponseStore(max_entries=2)
    _put(store, "a")
    _put(store, "b")
    store.conversation("a")  # (used: b is now the oldest)
    _put(store, "c")
    assert len(store) == 2
    store.conversation("a")
    store.conversation("c")
    with pytest.raises(ApiError):
        store.conversation("b")


def test_entries_expire_after_their_ttl() -> None:
    store = ResponseStore(ttl_s=0.05)
    _put(store, "a")
    time.sleep(0.1)
    with pytest.raises(ApiError):
        store.conversation("a")
    assert len(store) == 0


def test_the_bytes_kept_are_bounded_and_a_delete_frees_them() -> None:
    store = ResponseStore(max_bytes=3000)
    for i in range(10):
        _put(store, f"r{i}", "y" * 500)
    assert 1 <= len(store) <= 5
    store.conversation("r9")
    _put(store, "huge", "z" * 5000)  # (bigger than the whole store: not kept, and nothing else dropped for it)
    with pytest.raises(ApiError):
        store.conversation("huge")
    assert store.conversation("r9")
    store.delete("r9")
    with pytest.raises(ApiError):
        store.response("r9")


def test_input_items_are_the_requests_own_inputs_as_openai_lists_them_a_page_at_a_time() -> None:
    store = ResponseStore()
    inputs = [{"type": "message", "role": "user", "content": f"m{i}"} for i in range(5)]
    store.put("resp_1", inputs + [{"type": "message", "role": "assistant", "content": []}], {"id": "resp_1"},
              inputs)
    page = store.input_items("resp_1", {})
    assert page["object"] == "list" and not page["has_more"]
    texts = [item["content"][0]["text"] for item in page["data"]]
    assert texts == ["m4", "m3", "m2", "m1", "m0"]  # (newest first: OpenAI's default order)
    assert all(i["content"][0]["type"] == "input_text" and i["status"] == "completed" and i["id"].startswith("msg_")
               for i in page["data"])
    assert store.input_items("resp_1", {}) == page  # (ids are given once)
    first = store.input_items("resp_1", {"order": "asc", "limit": "2"})
    assert [i["content"][0]["text"] for i in first["data"]] == ["m0", "m1"] and first["has_more"]
    nxt = store.input_items("resp_1", {"order": "asc", "limit": "2", "after": first["last_id"]})
    assert [i["content"][0]["text"] for i in nxt["data"]] == ["m2", "m3"] and nxt["has_more"]
    back = store.input_items("resp_1", {"order": "asc", "limit": "2", "before": nxt["first_id"]})
    assert back["data"] == first["data"]
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "up"}):
        with pytest.raises(ApiError) as err:
            store.input_items("resp_1", bad)
        assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        store.input_items("resp_1", {"after": "msg_nope"})
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        store.input_items("resp_nope", {})
    assert err.value.status == 404
