"""Values that must never be shown: `Secret` (a string whose repr and str are masked) and URLs with a password.

`kling_relay.shared.settings` re-exports `Secret`; code imports it from either.
"""

from __future__ import annotations

from urllib.parse import urlsplit


class Secret:
    """A string that never shows itself in repr(), str() or a log line; call .reveal() to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def without_password(url: str) -> str:
    """`url` with the password of its userinfo replaced by `***` (unchanged when it has none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class NamedToken(Secret):
    """A bearer token with the name it is known by (an app's or an operator's): the name may be shown anywhere
    (events, logs, metrics), the token never."""

    __slots__ = ("name",)

    def __init__(self, name: str, value: str) -> None:
        super().__init__(value)
        self.name = name

    def __repr__(self) -> str:
        return f"NamedToken({self.name!r}, '***')"

    __str__ = __repr__
