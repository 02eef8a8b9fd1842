"""safe_fetch against local HTTP(S) servers on loopback and fake DNS answers; no internet needed.

Every connection the fetcher opens goes through the `connections` fixture, which records it and
refuses any non-loopback address, so a "public" address from a fake resolver can never be dialled.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import capabilities
import safe_fetch
from safe_fetch import (
    BlockedURL,
    FetchError,
    FetchPolicy,
    FetchTimeout,
    ImageTooLarge,
    InvalidURL,
    TooManyRedirects,
    UnreachableURL,
    UnsupportedMediaType,
    UpstreamHTTPError,
    fetch_image,
    non_public_reason,
)

LOCAL = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}))


def make_image(fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = make_image("PNG")


# --- local servers --------------------------------------------------------------------------


class LocalServer:
    """A threaded HTTP/1.1 server on loopback; `routes` maps a path to a function of the handler."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict = {}
        self.seen: list[dict] = []  # one entry per request: path, Host, User-Agent, local address
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.seen.append(
                    {
                        "path": self.path,
                        "host": self.headers["Host"],
                        "user_agent": self.headers["User-Agent"],
                        "local_address": self.connection.getsockname()[0],
                    }
                )
                owner.routes.get(self.path, lambda h: send(h, b"no such route", "text/plain", 404))(self)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

            def finish_request(self, request, client_address) -> None:
                # The handshake runs in the request's thread, so a failing client cannot stall the server.
                if tls is not None:
                    request = tls.wrap_socket(request, server_side=True)
                super().finish_request(request, client_address)

            def handle_error(self, request, client_address) -> None:
                pass  # clients that hang up or fail TLS on purpose are the point of these tests

        self.httpd = Server((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, body: bytes, content_type: str = "image/png", status: int = 200, headers=()) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes, content_type: str = "image/png"):
    return lambda h: send(h, body, content_type)


def redirect(location: str, status: int = 302):
    return lambda h: send(h, b"", "text/plain", status, [("Location", location)])


def serve_chunked(body: bytes, chunk: int = 1000):
    def route(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for start in range(0, len(body), chunk):
                part = body[start : start + chunk]
                h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading at its cap

    return route


def serve_until_close(body: bytes):
    """No Content-Length and no chunking: the body ends when the connection does."""

    def route(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.wfile.write(body)

    return route


def drip(server: LocalServer, head: bytes = b"", interval: float = 0.5):
    """Send `head` at once, then one byte every `interval` seconds until the client gives up."""

    def route(h) -> None:
        try:
            h.wfile.write(head)
            payload = b"HTTP/1.1 200 OK\r\n" if not head else b"x" * 1000
            for byte in payload:
                if server.stop.wait(interval):
                    return
                h.wfile.write(bytes([byte]))
        except OSError:
            pass
        h.close_connection = True

    return route


@pytest.fixture
def server():
    local = LocalServer()
    yield local
    local.close()


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every (address, port) safe_fetch connects to; anything but loopback fails the test instead."""
    made: list[tuple[str, int]] = []
    real_create_connection = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert ipaddress.ip_address(address[0]).is_loopback, f"test tried to connect to {address}"
        made.append((address[0], address[1]))
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(safe_fetch.socket, "create_connection", guarded)
    return made


class FakeDNS:
    """getaddrinfo with canned answers, IP literals answered as themselves; `later` answers replace
    `answers` from a host's second query on."""

    def __init__(self, answers: dict[str, list[str]], later: dict[str, list[str]] | None = None) -> None:
        self.answers, self.later, self.calls = answers, later or {}, []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        table = self.later if host in self.calls and host in self.later else self.answers
        self.calls.append(host)
        if host not in table:
            with contextlib.suppress(ValueError):
                return self._infos([str(ipaddress.ip_address(host))], port)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self._infos(table[host], port)

    @staticmethod
    def _infos(addresses: list[str], port: int) -> list[tuple]:
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in addresses
        ]


def expect(error_class: type[FetchError], status: int, code: str, *fragments: str, **fetch_kwargs):
    """Run fetch_image and check what the gateway would answer: class, status, code and message."""
    with pytest.raises(error_class) as caught:
        fetch_image(**fetch_kwargs)
    assert (caught.value.status, caught.value.code) == (status, code)
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value


# --- normal fetches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("GIF", "image/gif"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_fetches_each_image_type_by_its_bytes(server, fmt, media_type):
    body = make_image(fmt)
    # A useless Content-Type: the type must come from the bytes.
    server.routes["/photo"] = serve(body, "application/octet-stream")

    image = fetch_image(server.url("/photo"), LOCAL)

    assert image.data == body
    assert image.media_type == media_type
    assert image.final_url == server.url("/photo")
    assert Image.open(io.BytesIO(image.data)).size == (8, 6)


def test_sends_host_and_user_agent_and_a_percent_encoded_path(server, connections):
    server.routes["/caf%C3%A9.png?size=large"] = serve(PNG)
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), user_agent="test-agent/9")

    fetch_image(server.url("/café.png?size=large"), policy)

    assert server.seen == [
        {
            "path": "/caf%C3%A9.png?size=large",
            "host": f"127.0.0.1:{server.port}",
            "user_agent": "test-agent/9",
            "local_address": "127.0.0.1",
        }
    ]
    assert connections == [("127.0.0.1", server.port)]


def test_a_png_labelled_text_html_is_still_an_image(server):
    server.routes["/p"] = serve(PNG, "text/html")
    assert fetch_image(server.url("/p"), LOCAL).media_type == "image/png"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<!doctype html><html><body><img src='/shirt.jpg'></body></html>", "image/jpeg"),
        (b"just some text", "text/plain"),
        (b'{"image": "nope"}', "application/json"),
        (b"BM but not a bitmap, only text", "image/bmp"),
        (b"", "image/png"),
    ],
)
def test_a_body_that_is_not_an_image_is_415(server, body, content_type):
    server.routes["/page"] = serve(body, content_type)
    expect(
        UnsupportedMediaType,
        415,
        "unsupported_media_type",
        "is not a JPEG, PNG, GIF, WebP, BMP or TIFF image",
        repr(content_type),
        url=server.url("/page"),
        policy=LOCAL,
    )


# --- redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_follows_each_redirect_status(server, status):
    server.routes["/old"] = redirect("/new", status)
    server.routes["/new"] = serve(PNG)

    image = fetch_image(server.url("/old"), LOCAL)

    assert image.data == PNG
    assert image.final_url == server.url("/new")


def test_follows_a_chain_up_to_the_limit_with_relative_locations(server):
    server.routes["/a/1"] = redirect("2")  # relative to /a/1
    server.routes["/a/2"] = redirect("/b/3")
    server.routes["/b/3"] = redirect(server.url("/c/img.png"))
    server.routes["/c/img.png"] = serve(PNG)

    image = fetch_image(server.url("/a/1"), LOCAL)

    assert image.final_url == server.url("/c/img.png")
    assert [seen["path"] for seen in server.seen] == ["/a/1", "/a/2", "/b/3", "/c/img.png"]


def test_one_redirect_too_many_is_refused(server):
    for hop in range(4):
        server.routes[f"/{hop}"] = redirect(f"/{hop + 1}")
    server.routes["/4"] = serve(PNG)

    expect(
        TooManyRedirects,
        422,
        "too_many_redirects",
        "more than 3 times",
        server.url("/4"),
        url=server.url("/0"),
        policy=LOCAL,
    )
    assert [seen["path"] for seen in server.seen] == ["/0", "/1", "/2", "/3"]


def test_max_redirects_zero_refuses_any_redirect(server):
    server.routes["/old"] = redirect("/new")
    server.routes["/new"] = serve(PNG)
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_redirects=0)
    expect(TooManyRedirects, 422, "too_many_redirects", url=server.url("/old"), policy=policy)


def test_a_redirect_into_a_loopback_address_is_refused(server, connections):
    # images.example is allowed by name (local testing); the address it redirects to is not.
    dns = FakeDNS({"images.example": ["127.0.0.1"]})
    policy = FetchPolicy(allow_hosts=frozenset({"images.example"}))
    server.routes["/photo"] = redirect(server.url("/secret"))

    expect(
        BlockedURL,
        400,
        "url_blocked",
        f"redirected to {server.url('/secret')}",
        "resolves to 127.0.0.1, a loopback address",
        url=server.url("/photo", host="images.example"),
        policy=policy,
        resolver=dns,
    )
    assert [seen["path"] for seen in server.seen] == ["/photo"]
    assert connections == [("127.0.0.1", server.port)]


@pytest.mark.parametrize(
    ("location", "error_class", "fragment"),
    [
        ("http://169.254.169.254/latest/meta-data/", BlockedURL, "169.254.169.254, a link-local address"),
        ("http://[::ffff:10.0.0.1]/", BlockedURL, "::ffff:a00:1, an IPv4-mapped address of 10.0.0.1, a private"),
        ("file:///etc/passwd", InvalidURL, "has the scheme 'file'"),
        ("http://user:secret@images.example/", InvalidURL, "contains credentials"),
    ],
)
def test_a_redirect_is_checked_like_the_first_url(server, connections, location, error_class, fragment):
    server.routes["/photo"] = redirect(location)
    with pytest.raises(error_class) as caught:
        fetch_image(server.url("/photo"), LOCAL)
    assert "redirected to" in caught.value.message
    assert fragment in caught.value.message
    assert connections == [("127.0.0.1", server.port)]


# --- addresses ------------------------------------------------------------------------------

BLOCKED_ADDRESSES = [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"),
    ("172.31.255.254", "a private address"),
    ("192.168.1.1", "a private address"),
    ("169.254.169.254", "a link-local address"),
    ("100.64.0.1", "a shared (carrier-grade NAT) address"),
    ("100.127.255.254", "a shared (carrier-grade NAT) address"),
    ("0.0.0.0", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("239.255.255.250", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "a reserved address"),
    ("192.0.2.10", "a special-purpose, non-public address"),
    ("198.18.0.1", "a special-purpose, non-public address"),
    ("::1", "a loopback address"),
    ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"),
    ("fc00::1", "a private address"),
    ("fd12:3456::1", "a private address"),
    ("fec0::1", "a site-local address"),
    ("ff02::1", "a multicast address"),
    ("ff0e::1", "a multicast address"),
    ("2001:db8::1", "a special-purpose, non-public address"),
    ("::ffff:127.0.0.1", "an IPv4-mapped address of 127.0.0.1, a loopback address"),
    ("::ffff:169.254.169.254", "an IPv4-mapped address of 169.254.169.254, a link-local address"),
    ("::ffff:192.168.0.1", "an IPv4-mapped address of 192.168.0.1, a private address"),
    ("2002:7f00:1::", "a 6to4 address of 127.0.0.1, a loopback address"),
    ("2002:a9fe:a9fe::1", "a 6to4 address of 169.254.169.254, a link-local address"),
    ("64:ff9b::a00:1", "a NAT64 address of 10.0.0.1, a private address"),
    ("64:ff9b::7f00:1", "a NAT64 address of 127.0.0.1, a loopback address"),
    ("::7f00:1", "a reserved address"),  # deprecated IPv4-compatible form
]


@pytest.mark.parametrize(("address", "kind"), BLOCKED_ADDRESSES)
def test_every_non_public_address_class_is_refused_before_connecting(connections, address, kind):
    dns = FakeDNS({"cdn.example": [address]})
    expect(
        BlockedURL,
        400,
        "url_blocked",
        f"'cdn.example' of http://cdn.example/shirt.jpg resolves to {ipaddress.ip_address(address)}, {kind}",
        url="http://cdn.example/shirt.jpg",
        resolver=dns,
    )
    assert connections == []
    assert dns.calls == ["cdn.example"]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://2130706433/", "resolves to 127.0.0.1, a loopback"),
        ("http://0x7f.1/", "resolves to 127.0.0.1, a loopback"),
        ("http://0177.0.0.1/", "resolves to 127.0.0.1, a loopback"),
        ("http://127.1/", "resolves to 127.0.0.1, a loopback"),
        ("http://0/", "resolves to 0.0.0.0, an unspecified"),
        ("http://0xa9fea9fe/latest/meta-data/", "resolves to 169.254.169.254, a link-local"),
        ("http://[::1]:8080/", "resolves to ::1, a loopback"),
        ("http://[::ffff:127.0.0.1]/", "an IPv4-mapped address of 127.0.0.1"),
        ("http://[::]/", "resolves to ::, an unspecified"),
        ("http://localhost/", "a loopback"),
        ("HTTPS://LOCALHOST/", "a loopback"),
    ],
)
def test_ip_literals_in_any_spelling_are_caught_by_the_resolved_address(connections, url, fragment):
    expect(BlockedURL, 400, "url_blocked", fragment, url=url)  # the real resolver: numeric, no DNS traffic
    assert connections == []


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34", "2002:5db8:d822::1", "64:ff9b::808:808"],
)
def test_public_addresses_pass_the_check(address):
    assert non_public_reason(address) is None


@pytest.mark.parametrize("answers", [["93.184.216.34", "10.0.0.5"], ["10.0.0.5", "93.184.216.34"]])
def test_one_private_address_among_public_ones_is_refused(connections, answers):
    dns = FakeDNS({"mixed.example": answers})
    expect(
        BlockedURL,
        400,
        "url_blocked",
        "resolves to 10.0.0.5, a private address",
        url="https://mixed.example/a.png",
        resolver=dns,
    )
    assert connections == []


def test_connects_to_the_address_it_checked_even_when_dns_changes_its_answer(server, connections):
    # A second lookup would get 127.0.0.2, where nothing listens: only the checked address works.
    dns = FakeDNS({"rebind.example": ["127.0.0.1"]}, later={"rebind.example": ["127.0.0.2"]})
    server.routes["/img.png"] = serve(PNG)

    image = fetch_image(server.url("/img.png", host="rebind.example"), LOCAL, resolver=dns)

    assert image.data == PNG
    assert dns.calls == ["rebind.example"]
    assert connections == [("127.0.0.1", server.port)]
    assert server.seen[0]["host"] == f"rebind.example:{server.port}"
    assert server.seen[0]["local_address"] == "127.0.0.1"


def test_resolves_and_checks_once_per_hop(server, connections):
    dns = FakeDNS({name: ["127.0.0.1"] for name in ("a.example", "b.example", "c.example")})
    server.routes["/1"] = redirect(server.url("/2", host="b.example"))
    server.routes["/2"] = redirect(server.url("/3", host="c.example"))
    server.routes["/3"] = serve(PNG)

    image = fetch_image(server.url("/1", host="a.example"), LOCAL, resolver=dns)

    assert image.final_url == server.url("/3", host="c.example")
    assert dns.calls == ["a.example", "b.example", "c.example"]
    assert connections == [("127.0.0.1", server.port)] * 3
    assert [seen["host"] for seen in server.seen] == [f"{name}.example:{server.port}" for name in "abc"]


def test_a_host_that_rebinds_to_a_private_address_on_the_next_hop_is_refused(server, connections):
    dns = FakeDNS({"rebind.example": ["127.0.0.1"]}, later={"rebind.example": ["10.0.0.1"]})
    server.routes["/1"] = redirect("/2")

    expect(
        BlockedURL,
        400,
        "url_blocked",
        "resolves to 10.0.0.1, a private address",
        url=server.url("/1", host="rebind.example"),
        policy=LOCAL,
        resolver=dns,
    )
    assert dns.calls == ["rebind.example", "rebind.example"]
    assert connections == [("127.0.0.1", server.port)]


# --- allowlist ------------------------------------------------------------------------------


def test_localhost_needs_the_allowlist(server):
    server.routes["/img.png"] = serve(PNG)
    url = server.url("/img.png", host="localhost")

    expect(BlockedURL, 400, "url_blocked", "'localhost'", "a loopback address", url=url)
    assert server.seen == []
    assert fetch_image(url, FetchPolicy(allow_hosts=frozenset({"localhost"}))).data == PNG


def test_a_cidr_allowlist_entry_covers_its_addresses_only(server):
    server.routes["/img.png"] = serve(PNG)
    dns = FakeDNS({"inside.example": ["127.0.0.1"], "outside.example": ["10.0.0.9"]})
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.0/8"}))

    assert fetch_image(server.url("/img.png", host="inside.example"), policy, resolver=dns).data == PNG
    expect(
        BlockedURL,
        400,
        "url_blocked",
        "10.0.0.9",
        url="http://outside.example/img.png",
        policy=policy,
        resolver=dns,
    )


def test_a_hostname_allowlist_entry_does_not_cover_other_names_on_the_same_address(connections):
    dns = FakeDNS({"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    policy = FetchPolicy(allow_hosts=frozenset({"images.example"}))
    expect(BlockedURL, 400, "url_blocked", "'other.example'", url="http://other.example/", policy=policy, resolver=dns)
    assert connections == []


def test_allowlisted_hosts_still_get_the_other_limits(server):
    server.routes["/big.png"] = serve(PNG)
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=len(PNG) - 1)
    expect(ImageTooLarge, 413, "image_too_large", url=server.url("/big.png"), policy=policy)
    expect(InvalidURL, 400, "invalid_url", url=f"ftp://127.0.0.1:{server.port}/big.png", policy=policy)


def test_fetches_over_ipv6_loopback():
    try:
        local = LocalServer(host="::1")
    except OSError as err:
        capabilities.unavailable(f"no IPv6 loopback here: {err}", capabilities.IPV6)
    try:
        local.routes["/img.png"] = serve(PNG)
        image = fetch_image(local.url("/img.png", host="[::1]"), FetchPolicy(allow_hosts=frozenset({"::1"})))
        assert image.data == PNG
        assert local.seen[0]["host"] == f"[::1]:{local.port}"
    finally:
        local.close()


# --- URLs refused before any lookup ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "has the scheme 'file'"),
        ("ftp://images.example/shirt.jpg", "has the scheme 'ftp'"),
        ("data:image/png;base64,iVBORw0KGgo=", "has the scheme 'data'"),
        ("gopher://images.example/", "has the scheme 'gopher'"),
        ("javascript:alert(1)", "has the scheme 'javascript'"),
        ("//images.example/shirt.jpg", "has no scheme"),
        ("images.example/shirt.jpg", "has no scheme"),
        ("http://user:pass@images.example/shirt.jpg", "contains credentials"),
        ("http://user@images.example/shirt.jpg", "contains credentials"),
        ("http://images.example@127.0.0.1/", "contains credentials"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("http://", "has no host"),
        ("http://[::1/", "is not a valid URL"),
        ("http://images.example:99999/", "is not a valid URL"),
        ("http://images.example:0/", "has port 0"),
        ("http://images.example:http/", "is not a valid URL"),
        ("http://exa mple.com/", "spaces or control characters"),
        ("http://images.example/a\nb", "spaces or control characters"),
        ("http://a..b/", "not a valid domain name"),
        (None, "must be a string, got NoneType"),
        (42, "must be a string, got int"),
    ],
)
def test_bad_urls_are_400_before_any_lookup(url, fragment):
    dns = FakeDNS({})
    expect(InvalidURL, 400, "invalid_url", fragment, url=url, resolver=dns)
    assert dns.calls == []


# --- failures upstream ----------------------------------------------------------------------


def test_a_name_that_does_not_resolve_is_422():
    expect(
        UnreachableURL,
        422,
        "url_unreachable",
        "Could not resolve the host 'nowhere.example'",
        url="http://nowhere.example/x.png",
        resolver=FakeDNS({}),
    )


def test_a_refused_connection_is_422():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the fetch: nothing listens there
    expect(
        UnreachableURL,
        422,
        "url_unreachable",
        f"Could not connect to '127.0.0.1' (127.0.0.1) port {port}",
        url=f"http://127.0.0.1:{port}/x.png",
        policy=LOCAL,
    )


@pytest.mark.parametrize("status", [403, 404, 500, 503])
def test_an_upstream_error_status_is_422(server, status):
    server.routes["/gone.png"] = lambda h: send(h, b"error page", "text/html", status)
    expect(
        UpstreamHTTPError, 422, "url_http_error", f"answered HTTP {status}", url=server.url("/gone.png"), policy=LOCAL
    )


def test_a_body_cut_short_of_its_content_length_is_422(server):
    def cut(h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "5000")
        h.end_headers()
        h.wfile.write(PNG[:20])
        h.close_connection = True

    server.routes["/cut.png"] = cut
    expect(UnreachableURL, 422, "url_unreachable", "after 20 bytes", url=server.url("/cut.png"), policy=LOCAL)


# --- time and size limits -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"",  # the status line itself arrives a byte at a time
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n",
    ],
    ids=["slow-headers", "slow-body"],
)
def test_a_slow_drip_is_cut_off_at_the_total_deadline(server, head):
    server.routes["/slow.png"] = drip(server, head, interval=0.3)
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), total_timeout=1.0)

    started = time.monotonic()
    expect(FetchTimeout, 422, "url_timeout", "within 1 s", url=server.url("/slow.png"), policy=policy)
    elapsed = time.monotonic() - started

    # Each byte arrives well inside any per-read timeout; only a total deadline stops this.
    assert 0.9 <= elapsed < 3


def test_a_too_large_content_length_is_refused_before_the_body(server):
    def announce_huge(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(10**9))
        h.end_headers()
        server.stop.wait(5)  # never sends the body: the size alone must decide

    server.routes["/huge.png"] = announce_huge
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=1000)

    started = time.monotonic()
    expect(
        ImageTooLarge,
        413,
        "image_too_large",
        "is 1000000000 bytes (Content-Length), more than the limit of 1000 bytes",
        url=server.url("/huge.png"),
        policy=policy,
    )
    assert time.monotonic() - started < 2.5  # the server would hold the connection for 5 s


@pytest.mark.parametrize("route", [serve_chunked, serve_until_close], ids=["chunked", "until-close"])
def test_a_body_without_content_length_is_capped_as_it_arrives(server, route):
    big = make_image("BMP", (200, 200))  # ~120 kB
    server.routes["/big"] = route(big)
    policy = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=50_000)
    expect(
        ImageTooLarge,
        413,
        "image_too_large",
        "sent more than the limit of 50000 bytes",
        url=server.url("/big"),
        policy=policy,
    )


@pytest.mark.parametrize("route", [serve, serve_chunked, serve_until_close], ids=["length", "chunked", "until-close"])
def test_an_image_of_exactly_max_bytes_is_accepted(server, route):
    server.routes["/img.png"] = route(PNG)
    exact = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=len(PNG))
    one_short = FetchPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_bytes=len(PNG) - 1)

    assert fetch_image(server.url("/img.png"), exact).data == PNG
    expect(ImageTooLarge, 413, "image_too_large", url=server.url("/img.png"), policy=one_short)


# --- HTTPS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    """A throwaway CA and a certificate for images.example it signed (files in a temp dir)."""
    if shutil.which("openssl") is None:
        capabilities.unavailable("the openssl command is needed to make test certificates", capabilities.OPENSSL)
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "ext.cnf").write_text("subjectAltName=DNS:images.example\nextendedKeyUsage=serverAuth\n")
    for command in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=safe_fetch test CA"],
        ["req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.example"],
        ["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
        + ["-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf"],
    ):
        subprocess.run(["openssl", *command], cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture
def https_server(test_ca):
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(test_ca / "leaf.pem", test_ca / "leaf.key")
    names: list[str | None] = []
    tls.sni_callback = lambda ssl_socket, name, context: names.append(name)
    local = LocalServer(tls=tls)
    local.sni_names = names
    local.routes["/img.png"] = serve(PNG)
    yield local
    local.close()


def test_https_uses_the_url_name_for_sni_and_certificate_while_dialling_the_checked_address(
    https_server, test_ca, connections
):
    dns = FakeDNS({"images.example": ["127.0.0.1"]})
    trust_test_ca = ssl.create_default_context(cafile=test_ca / "ca.pem")

    image = fetch_image(
        https_server.url("/img.png", host="images.example", scheme="https"),
        FetchPolicy(allow_hosts=frozenset({"images.example"})),
        resolver=dns,
        ssl_context=trust_test_ca,
    )

    assert image.data == PNG
    assert https_server.sni_names == ["images.example"]
    assert https_server.seen[0]["host"] == f"images.example:{https_server.port}"
    assert connections == [("127.0.0.1", https_server.port)]


def test_https_refuses_a_certificate_for_another_name(https_server, test_ca):
    dns = FakeDNS({"shop.example": ["127.0.0.1"]})
    expect(
        UnreachableURL,
        422,
        "url_unreachable",
        "The TLS certificate of 'shop.example' could not be verified",
        url=https_server.url("/img.png", host="shop.example", scheme="https"),
        policy=FetchPolicy(allow_hosts=frozenset({"shop.example"})),
        resolver=dns,
        ssl_context=ssl.create_default_context(cafile=test_ca / "ca.pem"),
    )
    assert https_server.seen == []


def test_https_verifies_against_the_system_trust_store_by_default(https_server):
    expect(
        UnreachableURL,
        422,
        "url_unreachable",
        "could not be verified",
        url=https_server.url("/img.png", host="images.example", scheme="https"),
        policy=FetchPolicy(allow_hosts=frozenset({"images.example"})),
        resolver=FakeDNS({"images.example": ["127.0.0.1"]}),
    )


# --- policy ---------------------------------------------------------------------------------


def test_from_env_defaults_when_nothing_is_set():
    assert FetchPolicy.from_env({}) == FetchPolicy()
    assert FetchPolicy.from_env({"FETCH_MAX_BYTES": "", "FETCH_ALLOW_HOSTS": "  "}) == FetchPolicy()
    assert FetchPolicy() == FetchPolicy(
        max_bytes=10 * 1024 * 1024,
        connect_timeout=3.0,
        total_timeout=10.0,
        max_redirects=3,
        allow_hosts=frozenset(),
        user_agent="clothing-gateway/1",
    )


def test_from_env_reads_every_setting():
    policy = FetchPolicy.from_env(
        {
            "FETCH_MAX_BYTES": "2048",
            "FETCH_CONNECT_TIMEOUT": "0.5",
            "FETCH_TIMEOUT_SECONDS": " 4 ",
            "FETCH_MAX_REDIRECTS": "0",
            "FETCH_ALLOW_HOSTS": "localhost, 127.0.0.1,,[::1], 10.0.0.0/8,Model-Tier.",
        }
    )
    assert (policy.max_bytes, policy.connect_timeout, policy.total_timeout, policy.max_redirects) == (
        2048,
        0.5,
        4.0,
        0,
    )
    assert policy.allow_hosts == {"localhost", "127.0.0.1/32", "::1/128", "10.0.0.0/8", "model-tier"}
    assert policy.allows("model-tier", ipaddress.ip_address("10.9.9.9"))
    assert policy.allows("anything", ipaddress.ip_address("10.9.9.9"))
    assert not policy.allows("anything", ipaddress.ip_address("192.168.0.1"))


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("FETCH_MAX_BYTES", "ten", "must be a whole number, got 'ten'"),
        ("FETCH_MAX_BYTES", "1.5", "must be a whole number, got '1.5'"),
        ("FETCH_MAX_BYTES", "0", "greater than 0, got 0"),
        ("FETCH_MAX_BYTES", "-5", "greater than 0, got -5"),
        ("FETCH_CONNECT_TIMEOUT", "soon", "must be a number of seconds, got 'soon'"),
        ("FETCH_CONNECT_TIMEOUT", "0", "greater than 0"),
        ("FETCH_TIMEOUT_SECONDS", "nan", "finite number of seconds"),
        ("FETCH_TIMEOUT_SECONDS", "inf", "finite number of seconds"),
        ("FETCH_TIMEOUT_SECONDS", "-1", "greater than 0"),
        ("FETCH_MAX_REDIRECTS", "-1", "0 or more, got -1"),
        ("FETCH_MAX_REDIRECTS", "many", "must be a whole number, got 'many'"),
        ("FETCH_ALLOW_HOSTS", "localhost:8080", "the entry 'localhost:8080'"),
        ("FETCH_ALLOW_HOSTS", "http://localhost", "the entry 'http://localhost'"),
        ("FETCH_ALLOW_HOSTS", "ok.example, bad host", "the entry 'bad host'"),
        ("FETCH_ALLOW_HOSTS", "10.0.0.0/33", "the entry '10.0.0.0/33'"),
    ],
)
def test_from_env_names_the_bad_variable_and_value(name, value, fragment):
    with pytest.raises(ValueError) as caught:
        FetchPolicy.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name} ")
    assert fragment in message
    assert "unset it for the default" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"allow_hosts": "localhost"}, "FetchPolicy.allow_hosts must be a collection of hosts"),
        ({"max_bytes": 0}, "FetchPolicy.max_bytes must be a whole number greater than 0"),
        ({"max_bytes": True}, "FetchPolicy.max_bytes"),
        ({"total_timeout": 0}, "FetchPolicy.total_timeout"),
        ({"user_agent": "x\r\nX-Injected: 1"}, "FetchPolicy.user_agent must be printable ASCII"),
    ],
)
def test_policy_rejects_bad_values_directly(kwargs, fragment):
    with pytest.raises(ValueError, match="^" + fragment.replace(".", r"\.")):
        FetchPolicy(**kwargs)


def test_error_classes_carry_the_gateway_answer():
    expected = {
        InvalidURL: (400, "invalid_url"),
        BlockedURL: (400, "url_blocked"),
        UnreachableURL: (422, "url_unreachable"),
        UpstreamHTTPError: (422, "url_http_error"),
        TooManyRedirects: (422, "too_many_redirects"),
        FetchTimeout: (422, "url_timeout"),
        ImageTooLarge: (413, "image_too_large"),
        UnsupportedMediaType: (415, "unsupported_media_type"),
    }
    for error_class, answer in expected.items():
        assert issubclass(error_class, FetchError)
        assert (error_class.status, error_class.code) == answer
