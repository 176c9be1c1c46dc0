"""The archive's totals, for `chatlog stats`."""

from __future__ import annotations

from chatlog.archive import VISIBLE, Archive, sql_int, sql_text
from chatlog.schema import message_count


def totals(archive: Archive) -> dict:
    """Totals, from the tables the session-row triggers keep exact (schema m007), plus the
    live counts of the few sessions still in progress: no scan of sessions or messages."""
    return archive.tolerant(lambda: _totals(archive))


def _totals(archive: Archive) -> dict:
    q = archive.conn.execute
    with archive.db.guard:
        sessions, said, answers, ended, duration_us = q(
            "SELECT " + ", ".join(sql_int(c, "0") for c in ("sessions", "client_messages", "server_messages", "ended", "duration_us"))
            + " FROM totals"
        ).fetchone()
        # The row counts of a session in progress are written when it ends: count it live.
        live = q(
            f"SELECT {sql_text('handle')}, {message_count('client')}, {message_count('server')} FROM sessions "
            f"WHERE ended_at IS NULL AND {VISIBLE}"
        ).fetchall()
        # Room participants are people too: their handles count, and what they said (read
        # through the participants' index on messages: proportional to the lines said in rooms).
        # (Each participant's session looked up by its key: no walk of the sessions table.)
        not_deleting = "NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = {p}session_id AND s.deleting != 0)"
        handles = q(
            "SELECT count(*) FROM (SELECT handle FROM handle_totals UNION "
            f"SELECT handle FROM participants WHERE handle IS NOT NULL AND {not_deleting.format(p='participants.')})"
        ).fetchone()[0]
        in_rooms = q(
            f"SELECT {sql_text('p.handle')}, count(DISTINCT p.session_id), "
            "(SELECT count(*) FROM messages m WHERE m.participant_id IN "
            "  (SELECT id FROM participants p2 WHERE p2.handle = p.handle) AND m.sender = 'client') "
            f"FROM participants p WHERE p.handle IS NOT NULL AND {not_deleting.format(p='p.')} GROUP BY p.handle"
        ).fetchall()
        hosts = q(  # (a room's people too: its session has no client host of its own)
            "SELECT count(*) FROM (SELECT host FROM host_totals UNION "
            f"SELECT host FROM participants WHERE host IS NOT NULL AND {not_deleting.format(p='participants.')})"
        ).fetchone()[0]
        by_handle = {
            h: [n, c, a]
            for h, n, c, a in q(
                f"SELECT {sql_text('handle')}, {sql_int('sessions', '0')}, {sql_int('client_messages', '0')}, "
                f"{sql_int('server_messages', '0')} FROM handle_totals "
                "ORDER BY client_messages + server_messages DESC, sessions DESC LIMIT ?",
                (5 + len(live),),
            )
        }
        def totals_of(h: str, otherwise: list[int]) -> list[int]:
            """A handle's [sessions, said, answers] as the totals table has them."""
            row = q(
                f"SELECT {sql_int('sessions', '0')}, {sql_int('client_messages', '0')}, "
                f"{sql_int('server_messages', '0')} FROM handle_totals WHERE handle = ?",
                (h,),
            ).fetchone()
            return list(row) if row else otherwise

        for h, c, a in live:
            said, answers = said + c, answers + a
            if h is not None:
                if h not in by_handle:
                    by_handle[h] = totals_of(h, [1, 0, 0])
                by_handle[h][1] += c
                by_handle[h][2] += a
        for h, n, c in in_rooms:
            if h not in by_handle:
                by_handle[h] = totals_of(h, [0, 0, 0])
            by_handle[h][0] += n
            by_handle[h][1] += c
        reasons = q(
            f"SELECT {sql_text('reason')}, {sql_int('sessions', '0')} FROM reason_totals ORDER BY sessions DESC, reason"
        ).fetchall()
        first = q(f"SELECT {sql_text('started_at')} FROM sessions WHERE {VISIBLE} ORDER BY started_at LIMIT 1").fetchone()
        last = q(f"SELECT {sql_text('started_at')} FROM sessions WHERE {VISIBLE} ORDER BY started_at DESC LIMIT 1").fetchone()
        refused = q(f"SELECT coalesce(sum({sql_int('count', '0')}), 0) FROM refusals").fetchone()[0]
    busiest = sorted(by_handle.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), -kv[1][0]))[:5]
    return {
        "sessions": sessions,
        "messages": said + answers,
        "client_messages": said,
        "server_messages": answers,
        "handles": handles,
        "hosts": hosts,
        "average_session_seconds": round(duration_us / ended / 1e6, 3) if ended else None,
        "first_session": first[0] if first else None,
        "last_session": last[0] if last else None,
        "busiest_handles": [
            {"handle": h, "sessions": n, "messages": c + a, "said": c, "answers": a}
            for h, (n, c, a) in busiest
        ],
        "end_reasons": {r: n for r, n in reasons},
        "refused_connections": refused,
    }
