"""Where the database lives: --db, else $CHATLOG_DB, else a per-user data file."""

from __future__ import annotations

import os
from pathlib import Path


def default_db_path() -> Path:
    env = os.environ.get("CHATLOG_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME")
    if not base or not os.path.isabs(base):
        # The XDG spec: a relative path there is invalid and ignored (it would put the
        # database wherever the command happens to be run from).
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "chatlog" / "chatlog.db"


def db_path(option: str | os.PathLike | None) -> Path:
    return Path(option).expanduser() if option else default_db_path()
