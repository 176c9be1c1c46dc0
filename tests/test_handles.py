"""Which handles may be taken (chatlog/handles.py): pure, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlog.handles import Names, fold, handle_problem, keys
from chatlog.sanitize import is_safe

IMPERSONATIONS = [
    "SERVER", "server", "ＳＥＲＶＥＲ", "ſerver",  # what compatibility folding caught already
    "SERVER\u034f", "SERVER\ufe0f", "SERVER\ufe00", "SERVER\U000e0100", "SERVER\U000e01ef",
    "SERVER\u17b4", "SER\u115fVER", "SERVER\u3164", "SERV\u1160ER", "SERVER\uffa0",
    "S\u0415RV\u0415R",  # Cyrillic Е twice
    "\u0405ERVER",  # Cyrillic Ѕ
    "s\u0435rv\u0435r",  # Cyrillic е, lower case
    "SERVER\u200b", "\u202eREVRES",
]


@pytest.mark.parametrize("claimed", IMPERSONATIONS, ids=ascii)
def test_nothing_passes_for_the_server(claimed):
    assert handle_problem(claimed, (), "SERVER") is not None


def test_the_reasons_say_what_is_wrong():
    assert handle_problem("server", (), "SERVER") == "the handle SERVER is the server's"
    assert handle_problem("S\u0415RV\u0415R", (), "SERVER") == "the handle S\u0415RV\u0415R looks like the server's (SERVER)"
    assert handle_problem("SERVER\u034f", (), "SERVER") == "the handle SERVER\u034f has an invisible or control character (\u034f)"
    assert handle_problem("alice", ["bob", "alice"], "SERVER") == "the handle alice is taken by someone here"
    assert handle_problem("\u0430lice", ["alice"], "SERVER") == "the handle \u0430lice looks like alice, who is here"
    assert handle_problem("ALICE", ["alice"], "SERVER") == "the handle ALICE looks like alice, who is here"


@pytest.mark.parametrize("handle", ["alice", "bob", "Dan", "日本", "héllo", "a_b-c.d", "😀", "5ERVER", "SERVERS"])
def test_ordinary_handles_pass(handle):
    assert handle_problem(handle, ["carol", "erin"], "SERVER") is None


def test_look_alikes_of_a_handle_in_use_are_refused():
    for twin in ["alice", "Alice", "ALICE", "\u0430lice", "al\u0456ce", "alice\ufe0f", "a\u200dlice", "ａｌｉｃｅ"]:
        assert handle_problem(twin, ["alice"], "SERVER") is not None, twin
    assert handle_problem("aIice", ["alice"], "SERVER") is not None  # capital I for l
    assert handle_problem("alice", ["aIice"], "SERVER") is not None


def test_ones_own_handle_is_not_in_the_way():
    names = Names(["alice", "bob"])
    assert handle_problem("Alice", names, "SERVER", own="alice") is None
    assert handle_problem("bob", names, "SERVER", own="alice") is not None
    names.remove("bob")
    assert handle_problem("bob", names, "SERVER", own="alice") is None
    names.add("bob")
    names.add("bob")  # two holders (never in a room, but counted): one removal leaves one
    names.remove("bob")
    assert handle_problem("bob", names, "SERVER") is not None


def test_a_custom_server_handle_is_the_one_protected():
    assert handle_problem("OP", (), "Op") is not None
    assert handle_problem("\u041ep", (), "Op") is not None  # Cyrillic О
    assert handle_problem("SERVER", (), "Op") is None


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=10), st.lists(st.text(min_size=1, max_size=10), max_size=5))
def test_an_accepted_handle_shows_as_itself_and_looks_like_nobody_present(handle, taken):
    problem = handle_problem(handle, taken, "SERVER")
    if problem is None:
        assert is_safe(handle)
        assert fold(handle) != fold("SERVER") and not keys(handle) & keys("SERVER")
        assert all(not keys(handle) & keys(t) and fold(handle) != fold(t) for t in taken)
    else:
        assert problem.startswith("the handle ")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=9),
       st.sampled_from([0x034F, 0xFE0F, 0xE0100, 0x17B4, 0x115F, 0x3164, 0x1160, 0xFFA0, 0x200B, 0x2060]),
       st.integers(0, 9))
def test_an_invisible_character_anywhere_is_refused(base, cp, at):
    handle = base[:at] + chr(cp) + base[at:]
    assert "invisible" in handle_problem(handle, (), "SERVER")
