"""The tolerant framer and line parsing, without sockets."""

from hypothesis import given, settings
from hypothesis import strategies as st

from chatlog.protocol import (
    PADDING_KEEP,
    MAX_LINE,
    QUIET,
    Frame,
    Framer,
    Run,
    format_client,
    format_server,
    parse,
    split_prefix,
    valid_handle,
)


def frames(*bursts, gap=0.0):
    """Feed bursts `gap` seconds apart, then flush as if the sender went quiet."""
    f = Framer()
    out, now = [], 100.0
    for burst in bursts:
        out += f.feed(burst, now)
        now += gap
    out += f.flush_if_quiet(now + QUIET + 0.01)
    return out


def texts(*bursts, gap=0.0):
    return [parse(x).text for x in frames(*bursts, gap=gap)]


def test_our_client_format_is_one_message_and_canonical():
    (fr,) = frames(b"brandon>hello server\n\0")
    msg = parse(fr)
    assert (msg.handle, msg.text, msg.raw, msg.is_quit) == ("brandon", "hello server", None, False)


def test_newline_only_and_crlf():
    assert texts(b"bob>hi\n") == ["hi"]
    assert texts(b"bob>hi\r\n") == ["hi"]
    assert parse(frames(b"bob>hi\r\n")[0]).raw == b"bob>hi\r\n"  # kept: differs from canonical


def test_space_after_prefix_and_no_prefix():
    assert split_prefix("bob> hi there") == ("bob", "hi there")
    assert split_prefix("bob>hi") == ("bob", "hi")
    assert split_prefix("just words") == (None, "just words")
    assert split_prefix("a>b>c") == ("a", "b>c")
    assert split_prefix("elevenchars>x") == (None, "elevenchars>x")
    assert split_prefix("two words>x") == (None, "two words>x")


def test_nul_padding_is_discarded_but_kept_in_raw():
    garbage = b"\x01\xffjunk\x00more" * 40
    (fr,) = frames(b"bob> hi\0" + garbage)
    msg = parse(fr)
    assert msg.text == "hi"
    assert msg.raw == b"bob> hi\0" + garbage


def test_fixed_size_buffer_of_zeros():
    buf = b"bob> hello\n".ljust(511, b"\0")
    assert texts(buf) == ["hello"]


def test_padding_split_across_bursts_is_swallowed_until_quiet():
    f = Framer()
    out = f.feed(b"bob>hi\0\x05garbage", 1.0)
    out += f.feed(b"more garbage\n", 1.01)  # same send, second segment
    assert [parse(x).text for x in out] == ["hi"]
    assert f.dropped == len(b"more garbage\n")
    out = f.feed(b"bob>next\n", 2.0)  # after a pause: a real message again
    # the padding that came in its own burst is handed on, so the store keeps a trace of it
    assert [(x.padding, x.raw) for x in out[:1]] == [(13, b"more garbage\n")]
    assert [parse(x).text for x in out[1:]] == ["next"]


def test_a_well_formed_line_after_a_nul_is_a_message_not_padding():
    """`bob>first\0`, then `bob>second message\n` 50 ms later, then `bob>third\n`."""
    f = Framer()
    out = f.feed(b"bob>first\0", 1.0)
    out += f.feed(b"bob>second message\n", 1.05)
    out += f.feed(b"bob>third\n", 1.06)
    assert [parse(x).text for x in out] == ["first", "second message", "third"]
    out = Framer().feed(b"bob>first\0\0\0bob>second\n", 1.0)  # in one burst, after NULs
    assert [parse(x).text for x in out] == ["first", "second"]
    assert out[0].raw == b"bob>first\0\0\0"


def test_junk_after_a_nul_stays_padding_even_if_it_looks_like_a_line():
    # stack garbage that happens to hold another handle's line is not that client's message
    out = Framer().feed(b"bob>hi\0eve>not bob\n" + b"\0" * 20, 1.0)
    assert [parse(x).text for x in out] == ["hi"]
    assert out[0].raw.endswith(b"eve>not bob\n" + b"\0" * 20)


def test_late_padding_is_bounded_but_counted():
    f = Framer()
    f.feed(b"bob>hi\0", 1.0)
    for k in range(100):
        f.feed(b"\xee" * 1000, 1.0 + k * 0.001)
    (pad,) = f.flush_if_quiet(5.0)
    assert pad.padding == 100_000 and len(pad.raw) == PADDING_KEEP





def test_padding_ends_when_we_speak():
    f = Framer()
    f.feed(b"bob>hi\0pad", 1.0)
    f.spoke()
    assert [parse(x).text for x in f.feed(b"bob>again\n", 1.01)] == ["again"]


def test_unterminated_burst_completes_after_quiet():
    f = Framer()
    assert f.feed(b"bob> no newline", 1.0) == []
    assert f.deadline() == 1.0 + QUIET
    assert f.flush_if_quiet(1.0 + QUIET / 2) == []
    (fr,) = f.flush_if_quiet(1.0 + QUIET + 1e-6)
    assert parse(fr).text == "no newline"


def test_byte_at_a_time():
    data = b"bob>hello\n\0"
    f, out = Framer(), []
    for i in range(len(data)):
        out += f.feed(data[i : i + 1], 1.0 + i * 0.001)
    assert [parse(x).text for x in out] == ["hello"]


def test_two_messages_coalesced():
    assert texts(b"bob>one\nbob>two\n") == ["one", "two"]
    assert texts(b"bob>one\n\0bob>two\n\0") == ["one", "two"]


def test_multibyte_split_across_segments():
    data = "bob>héllo 😀\n".encode()
    cut = data.index(b"\xf0") + 2
    assert texts(data[:cut], data[cut:]) == ["héllo 😀"]


def test_invalid_utf8_is_replaced_and_raw_kept():
    (fr,) = frames(b"bob>\xff\xfe ok\n\0")
    msg = parse(fr)
    assert msg.text == "\ufffd\ufffd ok"
    assert msg.raw == b"bob>\xff\xfe ok\n\0"


def test_empty_message():
    assert texts(b"bob>\n\0") == [""]
    assert texts(b"\n") == [""]


def test_quit_forms():
    for data in (b"\\quit\n", b"bob>\\quit\n\0", b"bob> \\quit", b"SERVER>\\quit\n"):
        (fr,) = frames(data)
        assert parse(fr).is_quit, data
    (fr,) = frames(b"bob>\\quitter\n")
    assert not parse(fr).is_quit


def test_overlong_line_is_cut_and_memory_bounded():
    f = Framer()
    chunk = b"x" * 65536
    out = []
    for i in range(160):  # 10 MiB with no newline
        out += f.feed(chunk, 1.0 + i * 0.001)
        assert len(f._buf) <= MAX_LINE and len(f._raw) <= MAX_LINE
    out += f.feed(b"tail\n", 1.0 + 160 * 0.001)
    assert len(out) == 1
    assert len(out[0].payload) == MAX_LINE
    assert out[0].cut == 160 * 65536 + 4 - MAX_LINE


def test_handles_and_formatting():
    assert valid_handle("brandon") and valid_handle("x") and valid_handle("0123456789")
    for bad in ("", "01234567890", "a b", "a>b", "tab\there"):
        assert not valid_handle(bad)
    assert format_client("bob", "hi") == b"bob>hi\n\0"
    assert format_server("hi") == b"SERVER>hi\n"


# -- property: random streams cut at random points -------------------------------------------

chunks = st.lists(st.binary(min_size=0, max_size=64), min_size=0, max_size=30)
alphabet = st.sampled_from([b"a", b"b>", b"\n", b"\0", b"\r", b"\xff", "é".encode(), b" "])
streams = st.lists(alphabet, max_size=200).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_random_bursts_never_raise(bursts):
    f = Framer()
    now = 0.0
    for b in bursts:
        for fr in f.feed(b, now):
            parse(fr)
        now += 0.01
    for fr in f.flush(now):
        parse(fr)


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_no_kept_byte_is_lost_whatever_the_segmentation(data, cuts):
    """Without padding (no NUL after a non-newline), every byte of the stream is in some frame's
    raw bytes, in order, however the stream is cut into segments arriving close together."""
    data = data.replace(b"\0", b"")  # NUL-led padding is discarded by design: checked elsewhere
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    f, out, now = Framer(), [], 0.0
    for a, b in zip(points, points[1:], strict=False):
        out += f.feed(data[a:b], now)
        now += 0.001
    out += f.flush(now)
    assert b"".join(fr.raw for fr in out) == data
    # and the payloads are exactly the lines
    *lines, last = data.split(b"\n")
    expected = [line.removesuffix(b"\r") for line in lines] + ([last] if last else [])
    assert [fr.payload for fr in out] == expected


@settings(max_examples=200, deadline=None)
@given(streams)
def test_segmentation_does_not_change_the_messages(data):
    whole = [fr.payload for fr in frames(data)]
    f, out = Framer(), []
    for i in range(len(data)):
        out += f.feed(data[i : i + 1], 0.0001 * i)
    out += f.flush(1.0)
    # byte-at-a-time gives the same messages, except that padding after a NUL is per-burst
    if b"\0" not in data:
        assert [fr.payload for fr in out] == whole


def _reference_raw(frame: Frame) -> bytes | None:
    """The raw bytes a message keeps, by definition: None when they are the canonical encoding
    of what was parsed (`handle>text` or the text, a newline, maybe a NUL)."""
    handle, text = split_prefix(frame.payload.decode("utf-8", "replace"))
    canonical = f"{handle}>{text}" if handle is not None else text
    return None if frame.raw in (f"{canonical}\n".encode(), f"{canonical}\n\0".encode()) else frame.raw


@settings(max_examples=500, deadline=None)
@given(streams, st.sampled_from([b"", b"\n", b"\r\n", b"\n\0", b"\0", b"\n\0\0", b"x\n"]))
def test_parse_keeps_raw_bytes_exactly_when_they_are_not_canonical(payload, ending):
    frame = Frame(payload, payload + ending, 0.0)
    assert parse(frame).raw == _reference_raw(frame)
    for fr in frames(payload + ending):
        assert parse(fr).raw == _reference_raw(fr)


def _reference_frames(data: bytes, max_line: int) -> list[tuple]:
    """What a stream without NUL frames into, written plainly: each line, its CR dropped, cut
    at max_line (the rest counted), its raw bytes what was kept of it and its newline."""
    *lines, last = data.split(b"\n")
    out = []
    for line in lines + ([last] if last else []):
        ended = len(out) < len(lines)
        kept = line[:max_line]
        payload = kept.removesuffix(b"\r") if ended else kept
        out.append((payload, kept + (b"\n" if ended and len(line) <= max_line else b""), len(line) - len(kept)))
    return out


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=200), max_size=10), st.integers(min_value=1, max_value=12))
def test_lines_split_at_once_frame_as_the_plain_reference(data, cuts, max_line):
    """A burst with no NUL is split in one go: the same frames, cut lines included, however the
    stream arrives."""
    data = data.replace(b"\0", b"")
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    f, out = Framer(max_line=max_line), []
    for a, b in zip(points, points[1:], strict=False):
        out += f.feed(data[a:b], 0.0)
    out += f.flush(0.0)
    assert [(fr.payload, fr.raw, fr.cut) for fr in out] == _reference_frames(data, max_line)


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_nothing_received_vanishes(data, cuts):
    """Every byte received is in some message's raw bytes, or counted in a padding frame."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    f, out, now = Framer(max_line=100_000), [], 0.0
    for a, b in zip(points, points[1:], strict=False):
        out += f.feed(data[a:b], now)
        now += 0.001
    out += f.flush(now)
    assert sum(fr.padding or len(fr.raw) for fr in out) == len(data)


def test_a_line_is_never_cut_in_two_by_a_reader_that_was_busy():
    """In a room relaying thousands of lines the loop may read a socket long after its bytes
    arrived: the end of a line read late continues it (it used to complete the first half as a
    message of its own, and the rest became another)."""
    f = Framer()
    assert f.feed(b"bob>the first ha", 1.0) == []
    (fr,) = f.feed(b"lf and the rest\n", 3.0)
    assert fr.payload == b"bob>the first half and the rest"
    # A reader on time completes an unterminated line at its deadline, as before.
    f = Framer()
    f.feed(b"bob> no newline", 1.0)
    (fr,) = f.flush_if_quiet(f.deadline() + 1e-6)
    assert [parse(x).text for x in [fr] + f.feed(b"bob> next\n", 3.0)] == ["no newline", "next"]


def test_cut_after_takes_at_most_the_limit_of_line_endings_and_keeps_cs372_terminators_whole():
    from chatlog.transport import cut_after

    assert cut_after(b"a\nb\nc\n", 2) == 4
    assert cut_after(b"a\n\0b\n\0c\n\0", 1) == 3  # "\n\0" stays together
    assert cut_after(b"\n" * 65536, 100) == 100
    assert cut_after(b"abc", 0) == 3  # no ending at all: nothing to cut
    assert cut_after(b"x\0y\0", 1) == 2
    for data in (b"", b"a", b"a\nb", b"\n\n\0\n"):
        for limit in range(0, 6):
            n = cut_after(data, limit)
            head = data[:n]
            assert head.count(b"\n") + head.count(b"\0") <= max(limit, 0) + (1 if head.endswith(b"\n\0") else 0)
            assert n == len(data) or data[:n].count(b"\n") + data[:n].count(b"\0") >= limit



def _reference_cut(data: bytes, limit: int) -> int:
    """cut_after by definition, a byte at a time: just past the limit-th ending (a NUL right
    after that newline with it), or all of it when it holds no more than that."""
    if data.count(b"\n") + data.count(b"\0") <= limit:
        return len(data)
    if limit <= 0:
        return 0
    seen = 0
    for i, byte in enumerate(data):
        if byte in (10, 0):
            seen += 1
            if seen == limit:
                return i + 2 if byte == 10 and data[i + 1:i + 2] == b"\0" else i + 1
    return len(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\n", b"\0", b"\n\0", b"xyz"]), max_size=60).map(b"".join),
       st.integers(min_value=-1, max_value=40))
def test_cut_after_is_its_definition(data, limit):
    from chatlog.transport import cut_after

    assert cut_after(data, limit) == _reference_cut(data, limit)

_line_text = st.lists(st.sampled_from([b"a", b"b>", b"\r", b"\xff", "é".encode(), b" "]), max_size=12).map(b"".join)
_client_lines = st.lists(st.tuples(_line_text, st.sampled_from([b"\n", b"\n\0"])), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_client_lines, _line_text, st.lists(st.integers(min_value=0, max_value=400), max_size=6),
       st.integers(min_value=1, max_value=12))
def test_lines_ended_by_a_newline_and_a_nul_split_at_once_as_one_by_one(lines, tail, cuts, max_line):
    """./chatclient ends each line with "\\n\\0": a burst of such lines is split at once, as a
    burst without NUL is, and frames as each line alone would: the NUL part of its line's
    terminator (in its raw bytes), cut lines counted, however the stream arrives (cut anywhere
    but between a newline and its NUL, where the NUL would start padding)."""
    data = b"".join(text + end for text, end in lines) + tail
    expected = []
    for text, end in lines:
        kept = text[:max_line]
        raw = kept + end if len(text) <= max_line else kept
        expected.append((kept.removesuffix(b"\r"), raw, len(text) - len(kept)))
    if tail:
        expected.append((tail[:max_line], tail[:max_line], len(tail) - len(tail[:max_line])))
    points = sorted({c % (len(data) + 1) for c in cuts if not (data[c % (len(data) + 1) - 1:c % (len(data) + 1) + 1] == b"\n\0")}
                    | {0, len(data)})
    f, out = Framer(max_line=max_line), []
    for a, b in zip(points, points[1:], strict=False):
        out += f.feed(data[a:b], 0.0)
    out += f.flush(0.0)
    assert [(fr.payload, fr.raw, fr.cut) for fr in out] == expected



_run_pieces = st.sampled_from([b"bob>hi", b"a", b"\n", b"\n\0", b"\0", b"\r\n", b"\r", b"b>", b" ", b"\xff",
                               b"y" * 20, b"\n\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_run_pieces, max_size=60).map(b"".join), st.lists(st.integers(min_value=0, max_value=600), max_size=6),
       st.sampled_from([8, 30, MAX_LINE]), st.lists(st.sampled_from([0.0, 0.01, 1.0]), min_size=7, max_size=7))
def test_a_run_stands_for_the_frames_its_lines_would_be(data, cuts, max_line, gaps):
    """What the intake reads is framed with `runs`: a stretch of whole lines is one Run. Its
    frames (over-long lines cut, "\r\n" taken as the framer takes it), with the frames around
    it, are what the framer gives line by line, and the framer is left holding the same, however
    the stream is cut."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    one, whole = Framer(max_line=max_line), Framer(max_line=max_line)
    at, runs = 1.0, 0
    for (a, b), gap in zip(zip(points, points[1:], strict=False), gaps, strict=False):
        at += gap
        expected = one.feed(data[a:b], at)
        got = []
        for item in whole.feed(data[a:b], at, runs=True):
            runs += type(item) is Run
            got += item.frames() if type(item) is Run else [item]
            if type(item) is Run:
                assert item.count == len(item.frames()) and item.at == at
        assert got == expected
        assert one.deadline() == whole.deadline()
        assert one.flush_if_quiet(at + 0.2) == whole.flush_if_quiet(at + 0.2)
    assert one.flush(at + 1) == whole.flush(at + 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), st.booleans()), min_size=1,
                max_size=40),
       st.integers(min_value=1, max_value=9))
def test_a_run_split_in_pieces_is_what_smaller_reads_would_have_brought(lines, pieces):
    """(A linked room publishes a large read as several: each piece must frame as the whole did.)"""
    data = b"".join(text.lstrip(b"\0") + (b"\n\0" if nul else b"\n") for text, nul in lines)
    run = Run(data, data.count(b"\n"), 5.0, max_line=8)
    parts = run.split(pieces)
    assert 1 <= len(parts) <= pieces and all(p.data for p in parts)
    assert b"".join(p.data for p in parts) == data and sum(p.count for p in parts) == run.count
    assert [f for p in parts for f in p.frames()] == run.frames()
    if pieces > 1 and run.count >= 2 * pieces and len(data) > 16 * pieces:
        assert len(parts) > 1
