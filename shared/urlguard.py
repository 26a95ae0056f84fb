"""SSRF-safe checks for the URLs the copy downloads from (`VIDEO_URL_ALLOWLIST`).

An allow-list entry is a host pattern, optionally with a scheme and a port:

* ``*.klingai.com`` — any subdomain of klingai.com (not ``klingai.com`` itself, never ``evilklingai.com``),
  https only, any port;
* ``cdn.example.com:8443`` — that host, https only, that port;
* ``http://127.0.0.1`` / ``http://127.0.0.1:8080`` — naming the scheme allows exactly that scheme (http for a
  local simulator); without a port any port matches, so name the port when the host is private.

`UrlAllowlist.check(url)` refuses (raises `UrlRefused`) a URL whose scheme is not http(s), that carries
userinfo (``https://cdn.klingai.com@evil.com/``), backslashes, whitespace or control characters, or whose
scheme/host/port matches no entry. It then resolves the host (``socket.getaddrinfo``) and checks EVERY
address: private, loopback, link-local (cloud metadata 169.254.169.254), unspecified, multicast, reserved and
other non-global addresses, IPv6 included (``::1``, ``fc00::/7``, ``fe80::/10``) and IPv4-mapped IPv6 judged by
the IPv4 address they carry, are refused unless the matching entry names that host or IP literally (not a
wildcard; an entry naming the host is chosen over a wildcard that matches it too). A host that does not resolve
raises `UrlResolutionError` — a network problem worth a retry, not a policy refusal.

DNS rebinding: `get_checked()` never lets requests resolve the name again. It sends through `PinnedAdapter`,
whose connections open a socket to one of the vetted addresses while keeping the original host name for the
Host header, TLS SNI and certificate verification, and which refuses a request for any other host (so a
parser disagreement between urllib.parse and urllib3 cannot smuggle in another host). Proxies
(``HTTPS_PROXY``...) are deliberately not used for these downloads: a proxy would resolve the name itself.
Redirects are never followed automatically: each ``Location`` is re-checked with the same rules, at most
`MAX_REDIRECTS` hops.

`UrlAllowlist.check_without_dns(url)` is every check that needs no DNS, for intake (a job's ``notify_url``):
the rules, and for a host that is an address literal the same address rule. An address literal is what the
system resolver reads as one without asking DNS: IPv4 and IPv6 literals and also the old numeric IPv4 forms
of ``inet_aton`` (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``), see `literal_address`.

Residual risks: ``getaddrinfo`` has no timeout of its own (the system resolver's, see resolv.conf, applies);
a host named literally in an entry may be private by design (that is the point of naming it).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import SSL_KEYWORDS

MAX_REDIRECTS = 5
_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CREDENTIAL_HEADERS = ("Authorization", "Proxy-Authorization")
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
#: In an ASCII URL: a control character, whitespace (every ASCII one is at most 0x20) or a backslash. One regex
#: search instead of a Python test per character (a signed video URL runs to some 200 characters).
_BAD_CHAR = re.compile(r"[\x00-\x20\\]")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class UrlRefused(Exception):
    """The URL is not allowed by policy (scheme, host, address, redirect); retrying will not help.

    `host` names the host when an allow-list entry could allow it (not on the list, or a non-public address that
    an entry naming the host would allow); None when no entry could (a malformed URL, another scheme).
    """

    def __init__(self, reason: str, *, host: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.host = host


class UrlResolutionError(Exception):
    """The host name did not resolve (DNS failure or timeout): a network problem, worth a retry."""

    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"cannot resolve {host}: {detail}")
        self.host = host


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry; `scheme` None means https only, `port` None means any port."""

    scheme: str | None
    host_pattern: str
    port: int | None

    @property
    def is_wildcard(self) -> bool:
        return self.host_pattern == "*" or self.host_pattern.startswith("*.")

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != (self.scheme or "https"):
            return False
        if self.port is not None and port != self.port:
            return False
        if self.host_pattern == "*":  # any host, public addresses only (check() enforces that)
            return True
        if self.is_wildcard:
            return host.endswith(self.host_pattern[1:])  # "*.a.com" → suffix ".a.com", so never "evila.com"
        return _same_host(host, self.host_pattern)


@dataclass(frozen=True)
class ResolvedTarget:
    """A URL that passed the checks, with the addresses it may be fetched from (connect only to these)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def redact_url(url: str) -> str:
    """scheme://host[:port]/path without userinfo, query or fragment (result URLs carry signatures)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _same_host(a: str, b: str) -> bool:
    ip_a, ip_b = _as_ip(a), _as_ip(b)
    if ip_a is not None or ip_b is not None:
        return ip_a == ip_b
    return a == b


def _as_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address glibc's inet_aton (and so getaddrinfo) reads in `host`, or None.

    One to four dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``); every part but the
    last is one byte, the last fills the bytes left (``127.1`` is 127.0.0.1, ``2130706433`` is 127.0.0.1).
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" else int(p, 8) if p.startswith("0") else int(p)
              for p in parts]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, value in enumerate(head):
        number |= value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """The address `host` names without DNS: an IP literal (brackets optional, IPv6 scope dropped) or a
    numeric IPv4 form the system resolver accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``); else None."""
    host = _normalise_host(host)
    ip = _as_ip(host.split("%", 1)[0])
    return ip if ip is not None else _inet_aton(host)


def _normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged by its IPv4 part)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if ip.teredo is not None:
            return False
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def _parse_entry(entry: str) -> AllowRule:
    if any(c.isspace() or c in "\\@/?#" for c in entry.replace("://", "", 1)) or not entry.isascii():
        raise ValueError(f"VIDEO_URL_ALLOWLIST entry {entry!r}: only [scheme://]host[:port] is allowed")
    scheme: str | None = None
    rest = entry
    if "://" in entry:
        scheme, rest = entry.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise ValueError(f"VIDEO_URL_ALLOWLIST entry {entry!r}: scheme must be http or https")
    try:
        parts = urlsplit(f"//{rest}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"VIDEO_URL_ALLOWLIST entry {entry!r}: {exc}") from None
    host = _normalise_host(parts.hostname or "")
    if not host:
        raise ValueError(f"VIDEO_URL_ALLOWLIST entry {entry!r}: no host")
    if "*" in host and host != "*" and not (host.startswith("*.") and "*" not in host[2:] and "." in host[2:]):
        raise ValueError(f"VIDEO_URL_ALLOWLIST entry {entry!r}: a wildcard must look like *.example.com or *")
    return AllowRule(scheme=scheme, host_pattern=host, port=port)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for host (IPv6 scope ids dropped); raises UrlResolutionError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlResolutionError(host, str(exc)) from None
    return [str(sockaddr[0]).split("%", 1)[0] for *_, sockaddr in infos]


def _display(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class UrlAllowlist:
    """The parsed `VIDEO_URL_ALLOWLIST`; `check()` vets a URL and returns where it may be fetched from.

    `resolver(host, port) -> [ip, ...]` is `system_resolver` (getaddrinfo) unless a caller supplies its own,
    e.g. a fixed table in tests.
    """

    def __init__(self, rules: tuple[AllowRule, ...], *, resolver: Resolver | None = None,
                 name: str = "VIDEO_URL_ALLOWLIST") -> None:
        self.rules = rules
        self.resolver: Resolver = resolver or system_resolver
        self.name = name

    @classmethod
    def parse(cls, raw: str, *, resolver: Resolver | None = None, name: str = "VIDEO_URL_ALLOWLIST") -> UrlAllowlist:
        """Parse a comma-separated list; raises ValueError naming the first bad entry. Empty allows nothing."""
        entries = [e.strip() for e in raw.split(",")]
        try:
            rules = tuple(_parse_entry(e) for e in entries if e)
        except ValueError as exc:
            raise ValueError(str(exc).replace("VIDEO_URL_ALLOWLIST", name, 1)) from None
        return cls(rules, resolver=resolver, name=name)

    def __repr__(self) -> str:
        return f"UrlAllowlist({self.rules!r})"

    def _split(self, url: str) -> tuple[SplitResult, str, str, int]:
        if not url.isascii() or _BAD_CHAR.search(url):
            raise UrlRefused("URL contains whitespace, control characters, backslashes or non-ASCII")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UrlRefused(f"unparsable URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise UrlRefused(f"scheme {scheme!r} is not http(s)")
        if "@" in parts.netloc:
            raise UrlRefused("URL carries userinfo (user@host)")
        host = _normalise_host(parts.hostname or "")
        if not host:
            raise UrlRefused("URL has no host")
        if _as_ip(host) is None and not _HOSTNAME.fullmatch(host):
            raise UrlRefused("host name has characters outside letters, digits, '-', '_' and '.'")
        return parts, scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]

    def match(self, url: str) -> tuple[AllowRule, str, str, int]:
        """The rule allowing url's scheme/host/port (no DNS): an entry naming the host itself before a wildcard,
        else the first; raises UrlRefused if none does."""
        _, scheme, host, port = self._split(url)
        matching = [rule for rule in self.rules if rule.matches(scheme, host, port)]
        if not matching:
            raise UrlRefused(f"{_display(scheme, host, port)} is not on {self.name}", host=host)
        named = [rule for rule in matching if not rule.is_wildcard]
        return (named or matching)[0], scheme, host, port

    def check_without_dns(self, url: str) -> tuple[AllowRule, str, str, int]:
        """match(url), and for a host that is an address literal (`literal_address`) the address rule of check():
        refused unless the address is public or the matching entry names the host itself. Host names pass
        here; check() vets what they resolve to."""
        rule, scheme, host, port = self.match(url)
        ip = literal_address(host)
        if ip is not None and rule.is_wildcard and not is_public_address(ip):
            raise UrlRefused(f"{host} is the non-public address {ip}", host=host)
        return rule, scheme, host, port

    def check(self, url: str) -> ResolvedTarget:
        """Vet url against the rules and every address its host resolves to (see the module docstring)."""
        rule, scheme, host, port = self.check_without_dns(url)
        literal = not rule.is_wildcard  # the entry names this host/IP itself
        addresses: list[str] = []
        for text in self.resolver(host, port):
            ip = ipaddress.ip_address(text)
            if not literal and not is_public_address(ip):
                raise UrlRefused(f"{host} resolves to non-public address {ip}", host=host)
            if str(ip) not in addresses:
                addresses.append(str(ip))
        if not addresses:
            raise UrlResolutionError(host, "no address")
        return ResolvedTarget(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))


class _PinnedMixin:
    """Connects the socket to the vetted addresses (in order) instead of resolving the host name again."""

    _dns_host: str

    def __init__(self, *args: Any, pinned_addresses: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pinned_addresses = pinned_addresses

    def _new_conn(self) -> socket.socket:
        name = self._dns_host  # Host header, SNI and certificate checks keep using the name
        last: Exception | None = None
        try:
            for address in self._pinned_addresses:
                self._dns_host = address
                try:
                    sock: socket.socket = super()._new_conn()  # type: ignore[misc]
                    return sock
                except (NewConnectionError, ConnectTimeoutError) as exc:
                    last = exc
        finally:
            self._dns_host = name
        assert last is not None  # addresses is never empty
        raise last


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class PinnedAdapter(HTTPAdapter):
    """A requests adapter bound to one ResolvedTarget: connects only to its vetted addresses, no proxy."""

    def __init__(self, target: ResolvedTarget) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.target = target
        self._pool: HTTPConnectionPool | None = None

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: bool | str | None,
        proxies: Mapping[str, str] | None = None, cert: tuple[str, str] | str | None = None,
    ) -> HTTPConnectionPool:
        verify = True if verify is None else verify  # None means "default", i.e. verify
        host_params, key_attrs = self.build_connection_pool_key_attributes(request, verify, cert)
        pool_kwargs: dict[str, Any] = dict(key_attrs)
        scheme, host, port = host_params["scheme"], _normalise_host(host_params["host"]), host_params["port"]
        port = port if port is not None else _DEFAULT_PORTS.get(scheme)
        t = self.target
        if (scheme, port) != (t.scheme, t.port) or not _same_host(host, t.host):
            raise UrlRefused(f"request for {_display(scheme, host, port)} does not match the vetted target")
        if self._pool is None:
            cls: type[HTTPConnectionPool] = _PinnedHTTPSPool
            if scheme == "http":
                cls = _PinnedHTTPPool
                pool_kwargs = {k: v for k, v in pool_kwargs.items() if k not in SSL_KEYWORDS}
            self._pool = cls(host_params["host"], port, maxsize=1, pinned_addresses=t.addresses, **pool_kwargs)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        super().close()


def get_checked(
    url: str, allowlist: UrlAllowlist, *, session: requests.Session,
    timeout: float | tuple[float, float], headers: Mapping[str, str] | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> requests.Response:
    """A streaming GET of url that connects only to vetted addresses and re-checks every redirect (send_checked)."""
    return send_checked("GET", url, allowlist, session=session, timeout=timeout, headers=headers,
                        max_redirects=max_redirects)


def send_checked(
    method: str, url: str, allowlist: UrlAllowlist, *, session: requests.Session,
    timeout: float | tuple[float, float], headers: Mapping[str, str] | None = None, data: bytes | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> requests.Response:
    """A streaming request to url that connects only to vetted addresses and re-checks every redirect.

    The session contributes its headers, cookies and TLS settings (verify/cert, REQUESTS_CA_BUNDLE), never
    its adapters, proxies or credentials (Authorization and Proxy-Authorization are removed at every hop).
    Returns the first non-redirect response, unread (stream=True); the caller must close it
    (`close_response`). Raises UrlRefused, UrlResolutionError or requests' own exceptions.
    """
    for _hop in range(max_redirects + 1):
        target = allowlist.check(url)
        adapter = PinnedAdapter(target)
        try:
            prepared = session.prepare_request(requests.Request(method, url, headers=dict(headers or {}), data=data))
            for name in _CREDENTIAL_HEADERS:  # a session shared with an API client must not leak its token
                prepared.headers.pop(name, None)
            env = session.merge_environment_settings(prepared.url, {}, True, None, None)  # as Session.request
            verify: bool | str = env["verify"] if env["verify"] is not None else True
            response = adapter.send(prepared, stream=True, timeout=timeout, verify=verify,
                                    cert=env["cert"], proxies={})
        except BaseException:
            adapter.close()
            raise
        if not response.is_redirect:
            return response
        location = response.headers["location"]
        close_response(response)
        url = urljoin(url, location)
    raise UrlRefused(f"more than {max_redirects} redirects")


def close_response(response: requests.Response) -> None:
    """Close a response from get_checked and the pinned connection pool behind it."""
    response.close()
    adapter = getattr(response, "connection", None)
    if isinstance(adapter, HTTPAdapter):
        adapter.close()
