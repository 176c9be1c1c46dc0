"""The one sanitiser every renderer uses."""

import pytest

from chatlog.render import Renderer
from chatlog.sanitize import is_safe, visible

HOSTILE = [
    ("\x1b[2J", "\\x1b[2J"),
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),
    ("\x1b[6n", "\\x1b[6n"),
    ("\x9b31m", "\\x9b31m"),  # C1 CSI as a character
    ("\x85", "\\x85"),
    ("a\u202eb", "a\\u202eb"),  # right-to-left override
    ("a\u200bb\u2066c\ufeff", "a\\u200bb\\u2066c\\ufeff"),
    ("over\rwrite", "over\\rwrite"),
    ("forged\nSERVER>line", "forged\\nSERVER>line"),
    ("tab\there", "tab\\there"),
    ("nul\x00del\x7f", "nul\\x00del\\x7f"),
    ("\u2028\u2029", "\\u2028\\u2029"),
    ("\udcff", "\\udcff"),  # a lone surrogate (surrogateescape)
    ("tag\U000e0041", "tag\\U000e0041"),
]


@pytest.mark.parametrize("text,shown", HOSTILE)
def test_dangerous_characters_become_visible(text, shown):
    assert visible(text) == shown
    assert not is_safe(text)
    out = visible(text)
    assert all(ch.isprintable() for ch in out)


@pytest.mark.parametrize(
    "text",
    ["plain", "[bold]x[/]", "[link=https://x]y", ":smile:", "trailing\\", "%s%n%x", "héllo 😀 日本", ""],
)
def test_harmless_text_is_unchanged(text):
    assert visible(text) == text
    assert is_safe(text)


def test_renderer_never_interprets_markup_or_escapes(tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "w") as stream:
        r = Renderer(stream, color=True)
        r.chat("client", "bo\x1bb", "[bold red]x[/] \x1b[2J :smile:")
        r.event("connected \x07")
    data = path.read_text()
    # Only our own SGR codes may appear: every ESC is followed by "[" and digits then "m".
    import re

    assert re.sub(r"\x1b\[[0-9;]*m", "", data) == (
        "bo\\x1bb>[bold red]x[/] \\x1b[2J :smile:\nconnected \\x07\n"
    )


def test_renderer_plain_when_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    path = tmp_path / "out.txt"
    with open(path, "w") as stream:
        Renderer(stream).chat("server", "SERVER", "hi")
    assert path.read_text() == "SERVER>hi\n"


def test_no_color_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    with open(tmp_path / "o", "w") as stream:
        assert not Renderer(stream).color


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _inert(out):
    import unicodedata

    return not any(unicodedata.category(ch) in UNSAFE_CATEGORIES for ch in out)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_output_is_always_inert(text):
    out = visible(text)
    assert _inert(out)
    assert visible(out) == out  # idempotent: the escapes are themselves safe
    assert visible(text) == text or not is_safe(text)  # safe text is never changed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoded_bytes_are_inert(data):
    assert _inert(visible(data.decode("utf-8", "surrogateescape")))


# Invisible characters that let `SERVER` + something draw as `SERVER` (issue 14): the combining
# grapheme joiner, variation selectors, a Khmer inherent vowel, Hangul fillers, a Mongolian
# variation selector, an unassigned default-ignorable code point.
INVISIBLE = [0x034F, 0xFE00, 0xFE0F, 0xE0100, 0xE01EF, 0x17B4, 0x17B5, 0x115F, 0x1160, 0x3164,
             0xFFA0, 0x180B, 0x2065, 0xE0FFF]


@pytest.mark.parametrize("cp", INVISIBLE, ids=[f"U+{cp:04X}" for cp in INVISIBLE])
def test_invisible_characters_become_visible(cp):
    shown = f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
    assert visible(f"SERVER{chr(cp)}") == f"SERVER{shown}"
    assert not is_safe(chr(cp))


def test_the_unsafe_ranges_are_unicode_data_not_a_hand_made_list():
    """UNSAFE_RANGES (a literal, so importing the sanitiser costs nothing) is exactly ICU's
    Cc, Cf, Zl, Zp and Default_Ignorable_Code_Point, with the surrogates (Cs, U+D800-U+DFFF, a
    block fixed by the standard; PyICU hands them over as U+FFFD): regenerate it when this fails."""
    import icu

    data = icu.UnicodeSet("[[:Cc:][:Cf:][:Zl:][:Zp:][:Default_Ignorable_Code_Point:]]")
    want = sorted([(ord(lo), ord(hi)) for lo, hi in data.ranges()] + [(0xD800, 0xDFFF)])
    from chatlog.sanitize import UNSAFE_RANGES

    literal = ", ".join(f"(0x{lo:X}, 0x{hi:X})" for lo, hi in want)
    assert UNSAFE_RANGES == want, f"UNSAFE_RANGES is stale (Unicode {icu.UNICODE_VERSION}): [{literal}]"


def test_many_lines_of_one_handle_render_as_each_would():
    """`chat_lines` (a room's run of lines, rendered at once) makes what `chat_line` makes of
    each, with or without color, and escapes as it does whatever is not printable ASCII."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    texts = st.lists(st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)),
                               st.text()), max_size=8)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.none(), st.text(max_size=12)), texts, st.booleans(), st.sampled_from(["client", "server"]))
    def same(handle, lines, color, sender):
        import io

        r = Renderer(io.StringIO(), color=color)
        assert r.chat_lines(sender, handle, lines) == [r.chat_line(sender, handle, t) for t in lines]

    same()
    r = Renderer(color=False)
    assert r.chat_lines("client", "al\x1bice", ["fine", "\x1b[2Jwiped"]) == ["al\\x1bice>fine", "al\\x1bice>\\x1b[2Jwiped"]


def test_visible_lines_keeps_newlines_and_makes_the_rest_visible():
    from chatlog.sanitize import visible_lines

    assert visible_lines("alice>hi\nSERVER>*** bob joined\n") == "alice>hi\nSERVER>*** bob joined\n"
    assert visible_lines("eve>\x1b[2J\n\x07\r\n") == "eve>\\x1b[2J\n\\x07\\r\n"
    assert visible_lines("caf\u00e9\n\u202eevil\n") == "caf\u00e9\n\\u202eevil\n"
