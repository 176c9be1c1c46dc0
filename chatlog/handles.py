"""Which handles a client may take: the one rule, used by the room (a first handle, a rename) and
by 1:1 (a claimed server handle is recorded and marked). Pure: no sockets, no store, no clock.

A handle is refused when
- it would not show as itself: it has a character `sanitize.visible` escapes (a control, format or
  default-ignorable character, such as U+034F, a variation selector or a Hangul filler), which
  let `SERVER` + something draw exactly as `SERVER`;
- it is, or looks like, the server's handle;
- it is, or looks like, a handle someone present uses (`taken`).

"Looks like" is Unicode's confusable skeleton (UTS #39) from ICU's SpoofChecker, a maintained
table, compared after compatibility folding and case folding (`fold`): `ＳＥＲＶＥＲ`, `ſerver`,
`SЕRVЕR` (Cyrillic Е), `ЅERVER` (Cyrillic Ѕ) and `aIice` (capital I for l) are all caught.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

import icu  # pyicu-wheels: ICU with its own Unicode data, no system library needed

from chatlog.sanitize import is_safe


def fold(handle: str) -> str:
    """The form two handles are compared in: compatibility-normalised and case-folded, so
    `server`, `ＳＥＲＶＥＲ` and `ſerver` all read as `SERVER`."""
    return unicodedata.normalize("NFKC", handle).casefold()


# Loaded with the policy, at start-up (about 15 ms): loaded on the first handle instead, it could
# fail mid-chat at the open-files limit, which a flood of connections reaches.
_skeleton = functools.partial(icu.SpoofChecker().getSkeleton, 0)


@functools.lru_cache(maxsize=4096)
def keys(handle: str) -> frozenset[str]:
    """The forms a handle is compared in: two handles look alike when these meet. The skeleton
    is case-sensitive and folding can hide a confusable (`I` for `l`), so both orders count."""
    return frozenset((_skeleton(fold(handle)), _skeleton(fold(_skeleton(handle)))))


class Names:
    """The handles in use, indexed by their keys, so a check costs the same with 10,000 here."""

    __slots__ = ("_by_key",)

    def __init__(self, handles: Iterable[str] = ()):
        self._by_key: dict[str, list[str]] = {}
        for h in handles:
            self.add(h)

    def add(self, handle: str) -> None:
        for k in keys(handle):
            self._by_key.setdefault(k, []).append(handle)

    def remove(self, handle: str) -> None:
        for k in keys(handle):
            holders = self._by_key.get(k)
            if holders and handle in holders:
                holders.remove(handle)
                if not holders:
                    del self._by_key[k]

    def clear(self) -> None:
        self._by_key.clear()

    def holder(self, handle: str, own: str | None = None) -> str | None:
        """A handle in use that `handle` looks like, other than `own` (the asker's own)."""
        for k in keys(handle):
            for h in self._by_key.get(k, ()):
                if h != own:
                    return h
        return None


def handle_problem(
    handle: str, taken: Names | Iterable[str] = (), server: str = "SERVER", own: str | None = None
) -> str | None:
    """Why `handle` may not be taken (words that complete "not relayed" notes and notices), or
    None. `taken`: the handles of those present; `own`: the asker's current handle, if any."""
    if not is_safe(handle):
        bad = next(ch for ch in handle if not is_safe(ch))
        return f"the handle {handle} has an invisible or control character ({bad})"
    if fold(handle) == fold(server):
        return f"the handle {server} is the server's"
    mine = keys(handle)
    if mine & keys(server):
        return f"the handle {handle} looks like the server's ({server})"
    names = taken if isinstance(taken, Names) else Names(taken)
    other = names.holder(handle, own)
    if other is None:
        return None
    if other == handle:
        return f"the handle {handle} is taken by someone here"
    return f"the handle {handle} looks like {other}, who is here"


def example(taken: Names | Iterable[str] = (), server: str = "SERVER") -> str:
    """A handle to suggest in a refusal, one that would be accepted."""
    names = taken if isinstance(taken, Names) else Names(taken)
    for h in ("alice", "carol", "dave", "erin", "frank"):
        if handle_problem(h, names, server) is None:
            return h
    return "alice"


def key_of(handle: str) -> str:
    """One key a binding is stored under (any of `keys` finds it, once loaded)."""
    return min(keys(handle))


class Bindings:
    """Handles bound to a client certificate's fingerprint (the archive's `identities`),
    indexed by their keys: a look-alike of a bound handle finds its owner too."""

    __slots__ = ("_by_key",)

    def __init__(self, pairs: dict[str, str] | None = None):
        self._by_key: dict[str, tuple[str, str]] = {}
        for handle, fingerprint in (pairs or {}).items():
            self.add(handle, fingerprint)

    def add(self, handle: str, fingerprint: str) -> None:
        for k in keys(handle):
            self._by_key[k] = (handle, fingerprint)

    def owner(self, handle: str) -> tuple[str, str] | None:
        """(the bound handle `handle` is or looks like, its fingerprint), or None."""
        for k in keys(handle):
            found = self._by_key.get(k)
            if found is not None:
                return found
        return None

    def remove(self, handle: str) -> list[str]:
        """Release the binding `handle` is or looks like; returns the handles released."""
        found = self.owner(handle)
        if found is None:
            return []
        for k in [k for k, v in self._by_key.items() if v[0] == found[0]]:
            del self._by_key[k]
        return [found[0]]


def bound_problem(handle: str, fingerprint: str | None, bindings: Bindings) -> str | None:
    """Why `handle` may not be used by a client presenting `fingerprint` (None: no
    certificate), given the bindings; None when it may (unbound, or bound to that certificate)."""
    found = bindings.owner(handle)
    if found is None or found[1] == fingerprint:
        return None
    owner, _ = found
    if owner != handle:
        return f"the handle {handle} looks like {owner}, which belongs to a verified user"
    if fingerprint is None:
        return f"the handle {handle} belongs to a verified user (connect over TLS with their identity)"
    return f"the handle {handle} belongs to another certificate"
