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
