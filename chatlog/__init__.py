"""chatlog: a turn-based TCP chat server that keeps a faithful, searchable SQLite transcript."""

__version__ = "0.1.0"
