"""Shared fixtures: real binaries, real sockets, real SQLite files."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build(target):
    subprocess.run(["make", "-s", "-C", str(ROOT), target], check=True)
    return ROOT / target


@pytest.fixture(scope="session")
def chatclient():
    """Path to the compiled ./chatclient (built once per test run)."""
    return _build("chatclient")


@pytest.fixture(scope="session")
def chatclient_asan():
    """Path to the AddressSanitizer/UBSan build of the client."""
    return _build("chatclient-asan")


@pytest.fixture(scope="session")
def valgrind():
    path = shutil.which("valgrind")
    if not path:
        pytest.skip("valgrind is not installed")
    return path


@pytest.fixture
def db_path(tmp_path):
    """A fresh database path; every command is pointed at it with --db and CHATLOG_DB."""
    path = tmp_path / "chat.db"
    os.environ["CHATLOG_DB"] = str(path)
    yield path
    os.environ.pop("CHATLOG_DB", None)
