"""The download allow-list: parsing, refusals before and after DNS, redirects and address pinning.

DNS answers for made-up names come from a fixed table passed as the allow-list's resolver (the sandbox has no
DNS); names that really resolve (localhost, IP literals) go through getaddrinfo. HTTP(S) servers are real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kling_relay.shared.urlguard import (
    MAX_REDIRECTS,
    AllowRule,
    PinnedAdapter,
    ResolvedTarget,
    UrlAllowlist,
    UrlRefused,
    UrlResolutionError,
    close_response,
    get_checked,
    literal_address,
    redact_url,
    system_resolver,
)

PUBLIC_IP = "93.184.216.34"
DNS = {
    "cdn.klingai.com": [PUBLIC_IP],
    "a.b.klingai.com": ["2606:2800:220:1:248:1893:25c8:1946", PUBLIC_IP],
    "loop.klingai.com": ["127.0.0.1"],
    "ten.klingai.com": ["10.1.2.3"],
    "p172.klingai.com": ["172.16.5.4"],
    "p192.klingai.com": ["192.168.0.10"],
    "meta.klingai.com": ["169.254.169.254"],
    "zero.klingai.com": ["0.0.0.0"],
    "cgnat.klingai.com": ["100.64.0.1"],
    "mcast.klingai.com": ["224.0.0.1"],
    "reserved.klingai.com": ["240.0.0.1"],
    "bcast.klingai.com": ["255.255.255.255"],
    "v6loop.klingai.com": ["::1"],
    "ula.klingai.com": ["fd00::1"],
    "linklocal.klingai.com": ["fe80::1"],
    "unspec6.klingai.com": ["::"],
    "mapped.klingai.com": ["::ffff:127.0.0.1"],
    "mapped10.klingai.com": ["::ffff:10.0.0.1"],
    "mcast6.klingai.com": ["ff02::1"],
    "mixed.klingai.com": [PUBLIC_IP, "10.0.0.1"],
}


def table_resolver(host: str, port: int) -> list[str]:
    if host in DNS:
        return DNS[host]
    return system_resolver(host, port)


@pytest.fixture()
def allowlist() -> UrlAllowlist:
    return UrlAllowlist.parse("*.klingai.com, http://127.0.0.1:8080", resolver=table_resolver)


# --- parsing ------------------------------------------------------------------------------------------------

def test_parse_entries() -> None:
    rules = UrlAllowlist.parse(" *.klingai.com ,cdn.example.com:8443, http://127.0.0.1, HTTP://[::1]:9000,,").rules
    assert rules == (
        AllowRule(scheme=None, host_pattern="*.klingai.com", port=None),
        AllowRule(scheme=None, host_pattern="cdn.example.com", port=8443),
        AllowRule(scheme="http", host_pattern="127.0.0.1", port=None),
        AllowRule(scheme="http", host_pattern="::1", port=9000),
    )


def test_parse_empty_allows_nothing() -> None:
    allow = UrlAllowlist.parse("")
    assert allow.rules == ()
    with pytest.raises(UrlRefused):
        allow.check("https://cdn.klingai.com/v.mp4")


def test_a_bare_star_allows_any_public_https_host_only() -> None:
    """`*` (the NOTIFY_URL_ALLOWLIST default): any host name, https only, public addresses only."""
    table = {"hooks.example.com": ["93.184.216.34"], "inside.example.com": ["10.0.0.7"]}
    allow = UrlAllowlist.parse("*", resolver=lambda host, port: table.get(host, ["127.0.0.1"]),
                               name="NOTIFY_URL_ALLOWLIST")
    assert allow.check("https://hooks.example.com/k").addresses == ("93.184.216.34",)
    for url in ("http://hooks.example.com/k", "https://inside.example.com/", "https://127.0.0.1/",
                "https://localhost/", "https://169.254.169.254/"):
        with pytest.raises(UrlRefused):
            allow.check(url)
    with pytest.raises(UrlRefused, match="NOTIFY_URL_ALLOWLIST"):
        UrlAllowlist.parse("*.example.org", name="NOTIFY_URL_ALLOWLIST").check("https://x.example.com/")


def test_the_default_allows_klings_documented_cdns_and_still_refuses_http_and_private_addresses() -> None:
    """Issue 9.1(a): the default used to be `*.klingai.com` alone, which refused the host Kling's docs show
    result videos on (p1.a.kwimgs.com) and the image host (h1.inkwai.com)."""
    from kling_relay.shared.settings_spec import SETTINGS

    default = next(s.default for s in SETTINGS if s.env == "VIDEO_URL_ALLOWLIST")
    assert isinstance(default, str)
    table = {"p1.a.kwimgs.com": [PUBLIC_IP], "v15-kling.klingai.com": [PUBLIC_IP],
             "v21-kling.klingai.com": [PUBLIC_IP], "h1.inkwai.com": [PUBLIC_IP],
             "inside.kwimgs.com": ["10.0.0.7"], "meta.inkwai.com": ["169.254.169.254"],
             "loop.klingai.com": ["127.0.0.1"]}
    allow = UrlAllowlist.parse(default, resolver=lambda host, port: table.get(host, [PUBLIC_IP]))
    for url in ("https://p1.a.kwimgs.com/bs2/upload-ylab-stunt/output/video.mp4?x-kcdn-pid=1",
                "https://v15-kling.klingai.com/bs2/upload-kling-api/video.mp4",
                "https://v21-kling.klingai.com/bs2/video.mp4", "https://h1.inkwai.com/bs2/image.png"):
        assert allow.check(url).addresses == (PUBLIC_IP,), url
    for url in ("http://p1.a.kwimgs.com/v.mp4", "http://v15-kling.klingai.com/v.mp4",  # https only
                "https://inside.kwimgs.com/v.mp4", "https://meta.inkwai.com/v.mp4",   # private after DNS
                "https://loop.klingai.com/v.mp4", "https://127.0.0.1/v.mp4", "https://kwimgs.com.evil.net/v.mp4",
                "https://evilkwimgs.com/v.mp4", "https://kwimgs.com/v.mp4"):
        with pytest.raises(UrlRefused):
            allow.check(url)


def test_a_refusal_names_the_host_only_when_an_entry_could_allow_it() -> None:
    """The copy waits (video_host_refused) for a host an operator can add; a URL no entry could allow fails."""
    allow = UrlAllowlist.parse("*.klingai.com", resolver=table_resolver)
    for url, host in (("https://cdn.example.org/v.mp4", "cdn.example.org"),
                      ("http://cdn.klingai.com/v.mp4", "cdn.klingai.com"),
                      ("https://loop.klingai.com/v.mp4", "loop.klingai.com"),
                      ("https://cdn.klingai.com@evil.example/v.mp4", None),
                      ("ftp://cdn.klingai.com/v.mp4", None)):
        with pytest.raises(UrlRefused) as refused:
            allow.check(url)
        assert refused.value.host == host, url


@pytest.mark.parametrize("entry", [
    "ftp://files.example.com", "*.com", "*klingai.com", "a.*.klingai.com", "**", "http://x.com/path",
    "user@x.com", "x.com:99999", "x.com:port", "http://", "x.com?a=1", "bad host.com", "evil.com\\x",
])
def test_parse_rejects_bad_entries_naming_them(entry: str) -> None:
    with pytest.raises(ValueError) as info:
        UrlAllowlist.parse(f"*.klingai.com, {entry}")
    assert repr(entry) in str(info.value)


# --- refusals -----------------------------------------------------------------------------------------------

REFUSED = [
    # scheme
    "http://cdn.klingai.com/v.mp4",               # https required unless the entry names http
    "ftp://cdn.klingai.com/v.mp4",
    "file:///etc/passwd",
    "gopher://cdn.klingai.com/",
    "https://127.0.0.1:8080/v.mp4",              # the literal entry names http, not https
    # not on the list
    "http://127.0.0.1:8081/v.mp4",               # other port than the entry's
    "http://127.0.0.1/v.mp4",
    "http://localhost:8080/v.mp4",               # loopback by another name
    "http://[::1]:8080/v.mp4",
    "http://[::ffff:127.0.0.1]:8080/v.mp4",
    "http://2130706433:8080/v.mp4",              # 127.0.0.1 as an integer
    "http://0x7f.0.0.1:8080/v.mp4",
    "https://10.0.0.1/v.mp4",
    "https://172.16.0.1/v.mp4",
    "https://192.168.1.1/v.mp4",
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254/latest/meta-data/",
    "https://0.0.0.0/v.mp4",
    "https://[::1]/v.mp4",
    "https://example.com/v.mp4",
    "https://evilklingai.com/v.mp4",             # the wildcard needs a dot before klingai.com
    "https://klingai.com.evil.com/v.mp4",
    "https://klingai.com/v.mp4",                 # *.klingai.com does not cover the apex
    "https://cdn.klingai.com.:443.evil.com/",
    # userinfo and parser tricks
    "https://cdn.klingai.com@evil.com/v.mp4",
    "https://user:pw@cdn.klingai.com/v.mp4",
    "https://cdn.klingai.com:443@evil.com/",
    "https://evil.com\\@cdn.klingai.com/v.mp4",
    "https://evil.com#@cdn.klingai.com/",
    "https://evil.com?@cdn.klingai.com/",
    "https://cdn.klingai.com /v.mp4",
    "https://cdn.klingai.com/v.mp4\r\nHost: evil.com",
    "https://cdn.klingai.com\t/",
    "https://cdn.kl\u0131ngai.com/",
    "https:///v.mp4",
    "https://evil.com%2F.klingai.com/v.mp4",
    "https://cdn%2Eklingai.com/v.mp4",
    "https://cdn.klingai.com:99999/",
    "not a url",
    "",
    # on the list by name, but resolving to a non-public address (every address is checked)
    "https://loop.klingai.com/v.mp4",
    "https://ten.klingai.com/v.mp4",
    "https://p172.klingai.com/v.mp4",
    "https://p192.klingai.com/v.mp4",
    "https://meta.klingai.com/latest/meta-data/",
    "https://zero.klingai.com/",
    "https://cgnat.klingai.com/",
    "https://mcast.klingai.com/",
    "https://reserved.klingai.com/",
    "https://bcast.klingai.com/",
    "https://v6loop.klingai.com/",
    "https://ula.klingai.com/",
    "https://linklocal.klingai.com/",
    "https://unspec6.klingai.com/",
    "https://mapped.klingai.com/",
    "https://mapped10.klingai.com/",
    "https://mcast6.klingai.com/",
    "https://mixed.klingai.com/v.mp4",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused(allowlist: UrlAllowlist, url: str) -> None:
    with pytest.raises(UrlRefused) as info:
        allowlist.check(url)
    assert info.value.reason


def test_private_address_named_by_a_literal_entry_is_allowed() -> None:
    allow = UrlAllowlist.parse("http://localhost:8080, https://internal.example, http://[::1]",
                               resolver=lambda host, port: ["10.9.8.7"] if host == "internal.example"
                               else system_resolver(host, port))
    target = allow.check("http://localhost:8080/v.mp4")
    assert "127.0.0.1" in target.addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in target.addresses)
    assert allow.check("https://internal.example/v.mp4").addresses == ("10.9.8.7",)
    assert allow.check("http://[::1]:1234/v.mp4").addresses == ("::1",)


def test_wildcard_never_allows_private_addresses_even_with_a_literal_entry_elsewhere() -> None:
    allow = UrlAllowlist.parse("*.klingai.com, http://127.0.0.1", resolver=table_resolver)
    with pytest.raises(UrlRefused):
        allow.check("https://loop.klingai.com/v.mp4")


# --- without DNS (a job's notify_url at intake) ---------------------------------------------------------------

NON_PUBLIC_LITERALS = [
    "https://127.0.0.1/x", "https://169.254.169.254/latest/meta-data/", "https://0.0.0.0/", "https://10.0.0.1/",
    "https://172.16.0.1/", "https://192.168.1.1/", "https://100.64.0.1/", "https://224.0.0.1/",
    "https://255.255.255.255/", "https://[::1]/x", "https://[::]/", "https://[fe80::1]/", "https://[fe80::1%25eth0]/",
    "https://[fd00::1]/", "https://[ff02::1]/", "https://[::ffff:127.0.0.1]/", "https://[::ffff:169.254.169.254]/",
    "https://2130706433/", "https://0x7f.1/", "https://0177.0.0.1/", "https://127.1/", "https://0x7f000001/",
    "https://0/", "https://127.0.0.1./", "https://0xA9.0xFE.0xA9.0xFE/", "https://[::1]:8443/",
]


@pytest.mark.parametrize("url", NON_PUBLIC_LITERALS)
def test_a_non_public_address_literal_is_refused_without_dns(url: str) -> None:
    """Issue 7: `https://127.0.0.1/x` and `https://169.254.169.254/x` passed intake (`match`) under `*` and were
    refused only at delivery; any form the resolver reads as an address is judged before a job is stored."""
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError(f"asked DNS for {host}")

    allow = UrlAllowlist.parse("*", resolver=no_dns, name="NOTIFY_URL_ALLOWLIST")
    with pytest.raises(UrlRefused, match="non-public address"):
        allow.check_without_dns(url)


def test_without_dns_names_pass_and_public_or_named_literals_are_allowed() -> None:
    allow = UrlAllowlist.parse("*, https://127.0.0.1:8443, https://[::1], https://10.1.2.3",
                               name="NOTIFY_URL_ALLOWLIST")
    for url in ("https://hooks.example.com/k", "https://localhost/k", "https://93.184.216.34/k",
                "https://[2606:2800:220:1:248:1893:25c8:1946]/k", "https://1.2.3.4.example.com/",
                "https://127.0.0.1:8443/k", "https://[::1]/k", "https://10.1.2.3/k"):
        assert allow.check_without_dns(url)[0] is not None, url
    assert allow.check("https://127.0.0.1:8443/k").addresses == ("127.0.0.1",)  # the named entry wins over `*`
    for url in ("https://127.0.0.1/k", "https://127.0.0.2:8443/k"):
        with pytest.raises(UrlRefused):  # another port or address than the entry names: only `*` matches
            allow.check_without_dns(url)


@pytest.mark.parametrize("host", [
    "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "0", "017700000001", "1.2.3", "1.2.3.4",
    "08.0.0.1", "0x", "1.2.3.4.5", "4294967296", "0x100000000", "1e1", "00x7f.1", "256.0.0.1", "1.256.1",
    "1.2.65536", "0.0.0.0", "example.com", "1.2.3.com", "-1", "1..2", "",
])
def test_literal_address_reads_numeric_hosts_as_the_system_resolver_does(host: str) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        expected = None
    else:
        expected = ipaddress.ip_address(infos[0][4][0])
    assert literal_address(host) == expected


# --- allowed ------------------------------------------------------------------------------------------------

def test_allowed_wildcard(allowlist: UrlAllowlist) -> None:
    target = allowlist.check("https://cdn.klingai.com/v.mp4?sig=abc")
    assert target == ResolvedTarget(url="https://cdn.klingai.com/v.mp4?sig=abc", scheme="https",
                                    host="cdn.klingai.com", port=443, addresses=(PUBLIC_IP,))


def test_allowed_wildcard_any_port_and_every_address_kept(allowlist: UrlAllowlist) -> None:
    target = allowlist.check("https://a.b.klingai.com:8443/v.mp4")
    assert target.port == 8443
    assert target.addresses == ("2606:2800:220:1:248:1893:25c8:1946", PUBLIC_IP)


def test_allowed_host_is_normalised(allowlist: UrlAllowlist) -> None:
    target = allowlist.check("HTTPS://CDN.KlingAI.com./v.mp4")
    assert (target.scheme, target.host) == ("https", "cdn.klingai.com")


def test_allowed_explicit_http_entry_with_port(allowlist: UrlAllowlist) -> None:
    target = allowlist.check("http://127.0.0.1:8080/videos/v.mp4")
    assert (target.scheme, target.host, target.port, target.addresses) == ("http", "127.0.0.1", 8080,
                                                                           ("127.0.0.1",))


def test_entry_without_port_allows_any_port() -> None:
    allow = UrlAllowlist.parse("http://127.0.0.1")
    assert allow.check("http://127.0.0.1:4567/").port == 4567
    assert allow.check("http://127.0.0.1/").port == 80


def test_unresolvable_host_is_a_resolution_error_not_a_refusal() -> None:
    allow = UrlAllowlist.parse("*.example.invalid")
    with pytest.raises(UrlResolutionError):
        allow.check("https://nothing.example.invalid/v.mp4")


def test_redact_url_drops_query_and_userinfo() -> None:
    assert redact_url("https://u:p@cdn.klingai.com:8443/a/v.mp4?X-Amz-Signature=s#f") == \
        "https://cdn.klingai.com:8443/a/v.mp4"


# --- real HTTP: redirects and pinning -----------------------------------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """GET /ok → 200 with the Host header echoed; /to?u=<url> → 302 there; /loop → 302 /loop."""

    protocol_version = "HTTP/1.1"
    seen: list[str]
    credentials: list[str | None]

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(self.path)
        self.credentials.append(self.headers.get("Authorization"))
        path, _, query = self.path.partition("?")
        if path == "/ok":
            body = f"host={self.headers['Host']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        location = "/loop" if path == "/loop" else query.removeprefix("u=")
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[str] = []
        self.credentials: list[str | None] = []
        handler = type("Handler", (Recorder,), {"seen": self.seen, "credentials": self.credentials})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture()
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture()
def session() -> Iterator[requests.Session]:
    s = requests.Session()
    yield s
    s.close()


def fetch(url: str, allow: UrlAllowlist, session: requests.Session) -> tuple[int, bytes]:
    response = get_checked(url, allow, session=session, timeout=(2, 5))
    try:
        return response.status_code, response.content
    finally:
        close_response(response)


def test_relative_redirect_is_followed(server: Server, session: requests.Session) -> None:
    allow = UrlAllowlist.parse(f"http://127.0.0.1:{server.port}")
    status, body = fetch(f"http://127.0.0.1:{server.port}/to?u=/ok", allow, session)
    assert (status, body) == (200, f"host=127.0.0.1:{server.port}".encode())
    assert server.seen == ["/to?u=/ok", "/ok"]


@pytest.mark.parametrize("location", [
    "http://169.254.169.254/latest/meta-data/", "http://localhost:{port}/ok", "http://127.0.0.1:1/ok",
    "https://127.0.0.1:{port}/ok", "http://[::1]:{port}/ok", "file:///etc/passwd", "https://loop.klingai.com/ok",
])
def test_redirect_to_a_refused_target_is_refused(server: Server, session: requests.Session, location: str) -> None:
    allow = UrlAllowlist.parse(f"http://127.0.0.1:{server.port}, *.klingai.com", resolver=table_resolver)
    with pytest.raises(UrlRefused):
        fetch(f"http://127.0.0.1:{server.port}/to?u={location.format(port=server.port)}", allow, session)
    assert len(server.seen) == 1 and server.seen[0].startswith("/to?")  # the target was never requested


def test_session_credentials_are_never_sent(server: Server, session: requests.Session) -> None:
    session.headers["Authorization"] = "Bearer kling-api-token"
    session.auth = ("user", "password")
    allow = UrlAllowlist.parse(f"http://127.0.0.1:{server.port}")
    assert fetch(f"http://127.0.0.1:{server.port}/to?u=/ok", allow, session)[0] == 200
    assert server.credentials == [None, None]


def test_redirect_loop_stops_after_max_hops(server: Server, session: requests.Session) -> None:
    allow = UrlAllowlist.parse(f"http://127.0.0.1:{server.port}")
    with pytest.raises(UrlRefused, match="redirects"):
        fetch(f"http://127.0.0.1:{server.port}/loop", allow, session)
    assert len(server.seen) == MAX_REDIRECTS + 1


def test_connection_goes_to_the_vetted_address_not_a_new_lookup(server: Server, session: requests.Session) -> None:
    # "video.sim.test" exists only in the allow-list's resolver: the system resolver would fail, so a 200
    # proves the socket went to the vetted address while Host kept the name.
    allow = UrlAllowlist.parse(f"http://video.sim.test:{server.port}",
                               resolver=lambda host, port: ["127.0.0.1"])
    status, body = fetch(f"http://video.sim.test:{server.port}/ok", allow, session)
    assert (status, body) == (200, f"host=video.sim.test:{server.port}".encode())


def test_pinned_adapter_refuses_a_request_for_another_host(server: Server, session: requests.Session) -> None:
    target = ResolvedTarget(url=f"http://a.test:{server.port}/ok", scheme="http", host="a.test",
                            port=server.port, addresses=("127.0.0.1",))
    adapter = PinnedAdapter(target)
    try:
        with pytest.raises(UrlRefused):
            adapter.send(session.prepare_request(requests.Request("GET", f"http://b.test:{server.port}/ok")),
                         timeout=2)
    finally:
        adapter.close()
    assert server.seen == []


def test_pinned_adapter_tries_the_next_vetted_address(server: Server, session: requests.Session) -> None:
    # The server listens on 127.0.0.1 only, so 127.0.0.3 (also loopback) refuses the connection at once.
    target = ResolvedTarget(url=f"http://a.test:{server.port}/ok", scheme="http", host="a.test",
                            port=server.port, addresses=("127.0.0.3", "127.0.0.1"))
    adapter = PinnedAdapter(target)
    try:
        response = adapter.send(session.prepare_request(requests.Request("GET", target.url)), timeout=2)
        response.close()
    finally:
        adapter.close()
    assert response.status_code == 200


# --- TLS: the name is kept for SNI and certificate checks while the socket goes to the pinned address ----

def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    cert, key = _self_signed(tmp_path, "video.sim.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv = Server(tls=context)
    yield srv, cert
    srv.close()


def test_https_pinned_keeps_sni_and_verifies_the_name(tls_server: tuple[Server, Path],
                                                       session: requests.Session) -> None:
    srv, cert = tls_server
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, if set, would win over session.verify
    session.verify = str(cert)
    allow = UrlAllowlist.parse(f"https://video.sim.test:{srv.port}", resolver=lambda host, port: ["127.0.0.1"])
    status, body = fetch(f"https://video.sim.test:{srv.port}/ok", allow, session)
    assert (status, body) == (200, f"host=video.sim.test:{srv.port}".encode())


def test_https_pinned_rejects_a_certificate_for_another_name(tls_server: tuple[Server, Path],
                                                            session: requests.Session) -> None:
    srv, cert = tls_server
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, if set, would win over session.verify
    session.verify = str(cert)
    allow = UrlAllowlist.parse(f"https://other.sim.test:{srv.port}", resolver=lambda host, port: ["127.0.0.1"])
    with pytest.raises(requests.exceptions.SSLError):
        fetch(f"https://other.sim.test:{srv.port}/ok", allow, session)


def test_refused_characters_are_those_of_the_per_character_rule() -> None:
    """_split's one-regex check refuses exactly what the rule `c.isspace() or ord(c) < 32 or c == "\\\\"` refuses
    in an ASCII URL (every ASCII character tried in a URL the allow-list would otherwise take)."""
    from kling_relay.shared.urlguard import _BAD_CHAR

    for code in range(128):
        c = chr(code)
        assert bool(_BAD_CHAR.search(f"https://cdn.example/a{c}b")) is (c.isspace() or code < 32 or c == "\\"), code
