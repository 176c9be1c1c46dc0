"""Handles that belong to someone: the first use of a handle over TLS with a client certificate
binds it to that certificate; from then on only that certificate may use it (or a look-alike of
it), in the room and in 1:1; `chatlog identities` lists and releases bindings."""

import re

from conftest import db_dicts, recv_until, run_chatlog, wait_until
from test_tls import WELCOME, client_identity, tls_connect, tls_port


def room_join(server, port, identity, handle):
    c = tls_connect(server, port, identity) if identity else server.connect()
    assert recv_until(c, b"\n").startswith(WELCOME)
    c.sendall(f"{handle}>hi\n".encode())
    return c


def test_a_bound_handle_is_refused_to_another_certificate_a_plain_client_and_a_look_alike(start_server, tmp_path):
    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    a, b = client_identity(tmp_path, "a"), client_identity(tmp_path, "b")
    alice = room_join(server, port, a, "alice")
    server.wait_for("alice joined")
    alice.close()
    server.wait_for(r"alice \(.*\) left")
    listener = room_join(server, port, None, "lis")
    server.wait_for("lis joined")
    for ident, handle in ((b, "alice"), (None, "alice"), (None, "aIice")):
        c = room_join(server, port, ident, handle)
        reply = recv_until(c, b"(not relayed)\n")
        assert b"verified user" in reply or b"another certificate" in reply, reply
        c.close()
    alice = room_join(server, port, a, "alice")  # its owner, again
    assert b"SERVER>*** alice joined\n" in recv_until(listener, b"alice joined\n")
    rows = db_dicts(server.db, "SELECT handle, transport, cert_fingerprint, verified FROM participants "
                               "WHERE handle = 'alice' ORDER BY id")
    assert [(r["transport"], r["cert_fingerprint"], r["verified"]) for r in rows] == [("tls", a[2], 1)] * 2
    notes = [r["note"] for r in db_dicts(server.db, "SELECT note FROM messages WHERE note LIKE '%not relayed%'")]
    assert len(notes) == 3
    assert all(r["handle"] != "aIice" for r in db_dicts(server.db, "SELECT handle FROM participants"))
    out = run_chatlog(server.db, "identities")
    assert re.search(rf"alice\s+{a[2]}\s+first .*sessions 2", out.stdout), out.stdout


def test_identities_forget_releases_a_handle_and_the_operator_can_too(start_server, tmp_path):
    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    a = client_identity(tmp_path, "a")
    room_join(server, port, a, "alice").close()
    room_join(server, port, a, "bob").close()
    server.wait_for(r"bob \(.*\) left")
    server.say("\\forget alice")
    server.wait_for("alice is no longer bound to a certificate")
    c = room_join(server, port, None, "alice")
    server.wait_for(r"alice joined \(")
    c.close()
    assert run_chatlog(server.db, "identities", "--forget", "nobody").exit_code != 0
    r = run_chatlog(server.db, "identities", "--forget", "BOB")
    assert r.exit_code == 0 and "released bob" in r.stderr
    assert "no handle is bound" in run_chatlog(server.db, "identities").stderr


def test_in_1to1_a_bound_handle_from_a_plain_client_is_recorded_and_marked(start_server, tmp_path):
    server = start_server("--tls-port", "0")
    port = tls_port(server)
    a = client_identity(tmp_path, "a")
    c = tls_connect(server, port, a)
    c.sendall(b"bob>hello\n")
    server.say("hi")
    assert recv_until(c, b"\n") == b"SERVER>hi\n"
    c.sendall(b"bob>\\quit\n")
    wait_until(lambda: db_dicts(server.db, "SELECT count(*) n FROM sessions WHERE end_reason IS NOT NULL")[0]["n"] == 1)
    plain = server.connect()
    plain.sendall(b"bob>I am bob too\n")
    server.wait_for("belongs to a verified user")
    rows = db_dicts(server.db, "SELECT handle, verified, transport FROM sessions ORDER BY id")
    assert [(r["handle"], r["verified"], r["transport"]) for r in rows] == [("bob", 1, "tls"), (None, 0, "tcp")]
    note = db_dicts(server.db, "SELECT note FROM messages WHERE text = 'I am bob too'")[0]["note"]
    assert "belongs to a verified user" in note


def test_chatclient_over_tls_to_the_real_server_pins_it_and_owns_its_handle(start_server, chatclient, tmp_path):
    """The real client: --tls --pin as the banner prints it; its own identity (made on first
    use) binds its handle; a second identity cannot take it."""
    import os

    import pexpect

    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    command = re.search(r"\./chatclient --tls --pin (SHA256:[0-9a-f]+) 127\.0\.0\.1 (\d+)", server.output)
    assert command and int(command.group(2)) == port

    def client(home, handle):
        env = dict(os.environ, TERM="xterm", HOME=str(home), XDG_CONFIG_HOME=str(home / "config"))
        p = pexpect.spawn(str(chatclient), ["--tls", "--pin", command.group(1), "127.0.0.1", str(port)],
                          env=env, encoding="utf-8", timeout=10)
        p.expect_exact("What would you like your chat handle to be> ")
        p.sendline(handle)
        return p

    owner = client(tmp_path / "owner", "alice")
    owner.sendline("hello from alice")
    server.wait_for("alice>hello from alice")
    rows = db_dicts(server.db, "SELECT transport, verified, cert_fingerprint FROM participants WHERE handle = 'alice'")
    assert rows and rows[0]["transport"] == "tls" and rows[0]["verified"] == 1 and rows[0]["cert_fingerprint"]
    owner.sendline("\\quit")
    owner.expect(pexpect.EOF)
    server.wait_for(r"alice \(.*\) left")
    other = client(tmp_path / "other", "alice")
    other.sendline("I am alice too")
    other.expect("belongs to another certificate")
    server.wait_for("belongs to another certificate")
    other.sendline("\\quit")
    other.expect(pexpect.EOF)


def test_verified_lines_are_marked_in_show_and_every_export_and_never_forged(start_server, tmp_path):
    """A line said under a handle bound to its client's certificate is marked (a `verified`
    field in json/jsonl/csv, a mark in text, md and html); a plain client's line, even one whose
    text or handle tries to look the same, is not."""
    import csv
    import io
    import json

    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    a = client_identity(tmp_path, "a")
    alice = room_join(server, port, a, "alice")
    server.wait_for("alice joined")
    plain = room_join(server, port, None, "\u2713")
    plain.sendall("\u2713>alice>forged\n".encode())
    alice.sendall(b"alice>signed line\n")
    server.wait_for("alice>signed line")
    db = server.db
    shown = run_chatlog(db, "show", "last").stdout
    assert "\u2713 alice>signed line" in shown
    assert not any(line.startswith("\u2713 ") and "forged" in line for line in shown.splitlines())
    rows = [json.loads(x) for x in run_chatlog(db, "export", "last", "-f", "jsonl").stdout.splitlines()]
    flags = {(r["handle"], r["text"]): r["verified"] for r in rows if r["sender"] == "client"}
    assert flags[("alice", "signed line")] is True and flags[("alice", "hi")] is True
    assert flags[("\u2713", "alice>forged")] is False and flags[("\u2713", "hi")] is False
    doc = json.loads(run_chatlog(db, "export", "last", "-f", "json").stdout)
    assert [m["verified"] for m in doc["sessions"][0]["messages"] if m["text"] == "signed line"] == [True]
    table = list(csv.DictReader(io.StringIO(run_chatlog(db, "export", "last", "-f", "csv").stdout)))
    assert {r["text"]: r["verified"] for r in table if r["sender"] == "client"}["signed line"] == "true"
    assert {r["text"]: r["verified"] for r in table if r["sender"] == "client"}["alice>forged"] == "false"
    html = run_chatlog(db, "export", "last", "-f", "html").stdout
    assert html.count('class="verified"') == 2  # alice's two lines
    md = run_chatlog(db, "export", "last", "-f", "md").stdout
    assert "    \u2713 alice>signed line" in md


def test_sessions_verified_lists_only_sessions_with_a_verified_handle(start_server, tmp_path):
    server = start_server("--tls-port", "0")
    port = tls_port(server)
    plain = server.connect()
    plain.sendall(b"pat>hello\n")
    server.say("hi pat")
    recv_until(plain, b"\n")
    plain.sendall(b"pat>\\quit\n")
    wait_until(lambda: db_dicts(server.db, "SELECT count(*) n FROM sessions WHERE end_reason IS NOT NULL")[0]["n"] == 1)
    c = tls_connect(server, port, client_identity(tmp_path, "v"))
    c.sendall(b"vic>hello\n")
    server.say("hi vic")
    recv_until(c, b"\n")
    out = run_chatlog(server.db, "sessions", "--verified", "--json").stdout
    import json

    assert [r["handle"] for r in json.loads(out)] == ["vic"]
    assert len(json.loads(run_chatlog(server.db, "sessions", "--json").stdout)) == 2


def test_show_says_how_a_1to1_client_connected(start_server, tmp_path):
    server = start_server("--tls-port", "0")
    port = tls_port(server)
    ident = client_identity(tmp_path, "s")
    c = tls_connect(server, port, ident)
    c.sendall(b"sam>hello\n")
    server.say("hi sam")
    recv_until(c, b"\n")
    shown = run_chatlog(server.db, "show", "last").stdout
    assert re.search(rf"transport: tls \(TLSv1\.[23], [^)]+\), certificate {ident[2]}, handle verified", shown), shown
    assert "\u2713 sam>hello" in shown
