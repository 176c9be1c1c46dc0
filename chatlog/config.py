"""Where the database lives: --db, else $CHATLOG_DB, else a per-user data file.

Worked out with os.path, so `chatlog path` does not import pathlib (and what it imports: ~5 ms
of its start-up); `db_path` gives the same as a Path."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def default_db_text() -> str:
    env = os.environ.get("CHATLOG_DB")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_DATA_HOME")
    if not base or not os.path.isabs(base):
        # The XDG spec: a relative path there is invalid and ignored (it would put the
        # database wherever the command happens to be run from).
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "chatlog", "chatlog.db")


def db_text(option: str | os.PathLike | None) -> str:
    return os.path.expanduser(os.fspath(option)) if option else default_db_text()


def default_db_path() -> Path:
    from pathlib import Path

    return Path(default_db_text())


def db_path(option: str | os.PathLike | None) -> Path:
    from pathlib import Path

    return Path(db_text(option))
