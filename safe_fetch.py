"""Fetch an image from a URL a stranger sent, without letting the URL reach into our own network.

The course's gateway calls ``urllib.request.urlopen(url)``: no timeout, no size limit, any scheme
(file:// included), and it follows redirects anywhere. A URL is user input, so this module:

- accepts only http and https, without credentials in the URL;
- resolves the host itself and refuses it when any address is not public (loopback, private,
  link-local such as the 169.254.169.254 cloud metadata service, multicast, ...), on every
  redirect hop, and then connects to exactly the address it checked, so a DNS answer that changes
  between the check and the connection (DNS rebinding) cannot slip past;
- bounds the whole exchange by a total deadline and a byte cap, counted as bytes arrive;
- decides the image type from the bytes' magic numbers, never from Content-Type.

Standard library only: the gateway image carries no HTTP client library. Errors carry the HTTP
status and a short code the gateway answers with, and a message saying what to change.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import os
import re
import socket
import ssl
import string
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from io import BufferedReader, RawIOBase
from typing import Any, NamedTuple
from urllib.parse import quote, urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK_SIZE = 64 * 1024
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
# The ranges people mean by "private"; other special-purpose ranges get a more general label.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


# --- errors ---------------------------------------------------------------------------------


class FetchError(Exception):
    """A URL could not be fetched as an image; `status` and `code` are what the gateway answers."""

    status = 422
    code = "fetch_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidURL(FetchError):
    status, code = 400, "invalid_url"


class BlockedURL(FetchError):
    status, code = 400, "url_blocked"


class UnreachableURL(FetchError):
    status, code = 422, "url_unreachable"


class UpstreamHTTPError(FetchError):
    status, code = 422, "url_http_error"


class TooManyRedirects(FetchError):
    status, code = 422, "too_many_redirects"


class FetchTimeout(FetchError):
    status, code = 422, "url_timeout"


class ImageTooLarge(FetchError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(FetchError):
    status, code = 415, "unsupported_media_type"


# --- policy ---------------------------------------------------------------------------------


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a whole number greater than 0, got {value!r}")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 or more, got {value!r}")
    return value


def _positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"must be a finite number of seconds greater than 0, got {value!r}")
    return float(value)


def _header_value(value: Any) -> str:
    if not isinstance(value, str) or not value.isprintable() or not value.isascii():
        raise ValueError(f"must be printable ASCII text, got {value!r}")
    return value


def _allow_entry(entry: Any) -> str | ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = str(entry).strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    text = text.rstrip(".")
    if not _HOSTNAME.fullmatch(text):
        raise ValueError(
            f"has the entry {entry!r}, which is not a hostname, IP address or CIDR network "
            "(write e.g. localhost, 127.0.0.1 or 10.0.0.0/8, without scheme or port)"
        )
    return text


def _allow_hosts(value: Any) -> frozenset[str]:
    # A lone string would be taken apart character by character.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"must be a collection of hosts such as {{'localhost'}}, got {value!r}")
    return frozenset(str(_allow_entry(entry)) for entry in value)


# Field name -> check returning the normalised value; shared by __init__ and from_env.
_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_bytes": _positive_int,
    "connect_timeout": _positive_seconds,
    "total_timeout": _positive_seconds,
    "max_redirects": _non_negative_int,
    "allow_hosts": _allow_hosts,
    "user_agent": _header_value,
}


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number, got {raw!r}") from None


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None


def _parse_list(raw: str) -> frozenset[str]:
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


# Environment variable -> (field, parser from text).
_ENV_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "FETCH_MAX_BYTES": ("max_bytes", _parse_int),
    "FETCH_CONNECT_TIMEOUT": ("connect_timeout", _parse_float),
    "FETCH_TIMEOUT_SECONDS": ("total_timeout", _parse_float),
    "FETCH_MAX_REDIRECTS": ("max_redirects", _parse_int),
    "FETCH_ALLOW_HOSTS": ("allow_hosts", _parse_list),
}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one fetch. `allow_hosts` lists hostnames, IPs or CIDR networks whose addresses may
    be non-public (local development); every other rule still applies to them."""

    max_bytes: int = 10 * 1024 * 1024
    connect_timeout: float = 3.0
    total_timeout: float = 10.0
    max_redirects: int = 3
    allow_hosts: frozenset[str] = frozenset()
    user_agent: str = "clothing-gateway/1"
    _allowed_names: frozenset[str] = field(init=False, repr=False, compare=False)
    _allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name, check in _FIELD_CHECKS.items():
            try:
                # Frozen: normalised values are stored the way dataclasses do it themselves.
                object.__setattr__(self, name, check(getattr(self, name)))
            except ValueError as err:
                raise ValueError(f"FetchPolicy.{name} {err}") from None
        entries = [_allow_entry(entry) for entry in self.allow_hosts]
        object.__setattr__(self, "_allowed_names", frozenset(e for e in entries if isinstance(e, str)))
        object.__setattr__(self, "_allowed_networks", tuple(e for e in entries if not isinstance(e, str)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FetchPolicy:
        """The policy from FETCH_* variables; unset or empty ones keep the defaults."""
        values = {}
        for env_name, (name, parse) in _ENV_SETTINGS.items():
            raw = environ.get(env_name, "").strip()
            if not raw:
                continue
            try:
                values[name] = _FIELD_CHECKS[name](parse(raw))
            except ValueError as err:
                shown = getattr(cls, name) or "none"
                raise ValueError(f"{env_name} {err}; unset it for the default ({shown})") from None
        return cls(**values)

    def allows(self, host: str, address: IPAddress) -> bool:
        """Whether `address` (an answer for `host`) skips the public-address check."""
        return host.rstrip(".") in self._allowed_names or any(address in net for net in self._allowed_networks)


# --- address classification -----------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form carries, where packets to it end up at that IPv4 address."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped address", address.ipv4_mapped
    if address.sixtofour is not None:
        return "a 6to4 address", address.sixtofour
    if address in _NAT64_PREFIX:
        return "a NAT64 address", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def non_public_reason(address: str | IPAddress) -> str | None:
    """None for a public unicast address, else what kind of address it is ("a loopback address")."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)):
        form, ipv4 = embedded
        reason = non_public_reason(ipv4)
        return f"{form} of {ipv4}, {reason}" if reason else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (this range holds cloud metadata services)"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if any(ip in net for net in _PRIVATE_NETWORKS):
        return "a private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    # is_global already excludes documentation, benchmarking, Teredo and other special ranges.
    if not ip.is_global:
        return "a special-purpose, non-public address"
    return None


# --- one request ----------------------------------------------------------------------------


class _Target(NamedTuple):
    url: str
    scheme: str
    host: str  # ASCII (IDNA) form, no IPv6 brackets: what DNS, Host and SNI get
    port: int
    request_target: str


def _parse_url(url: Any) -> _Target:
    if not isinstance(url, str):
        raise InvalidURL(f"The image URL must be a string, got {type(url).__name__}.")
    url = url.strip()
    if not url:
        raise InvalidURL("The image URL is empty; send the http:// or https:// address of an image.")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise InvalidURL(f"The URL {url!r} contains spaces or control characters; percent-encode them (%20).")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise InvalidURL(f"{url!r} is not a valid URL ({err}).") from None
    if parts.scheme not in _DEFAULT_PORTS:
        scheme = f"the scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InvalidURL(f"{url!r} has {scheme}; only http:// and https:// image URLs can be fetched.")
    if "@" in parts.netloc:
        raise InvalidURL(f"{url!r} contains credentials (user:password@); only public images can be fetched.")
    if not parts.hostname:
        raise InvalidURL(f"{url!r} has no host name.")
    if port == 0:
        raise InvalidURL(f"{url!r} has port 0; use a port from 1 to 65535 or leave it out.")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidURL(f"{url!r} has the host {parts.hostname!r}, which is not a valid domain name.") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # http.client sends the request line as ASCII: encode what browsers would, keep existing escapes.
    request_target = quote(path, safe=string.punctuation)
    return _Target(url, parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme], request_target)


def _checked_addresses(target: _Target, policy: FetchPolicy, resolver: Resolver) -> list[str]:
    """The host's addresses, in the resolver's order, once every one of them passed the check."""
    try:
        answers = resolver(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise UnreachableURL(
            f"Could not resolve the host {target.host!r} of {target.url} ({err}); check the URL for typos."
        ) from None
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in answers:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        reason = None if policy.allows(target.host, ip) else non_public_reason(ip)
        if reason:
            raise BlockedURL(
                f"The host {target.host!r} of {target.url} resolves to {ip}, {reason}; "
                "only images on public addresses can be fetched (operators can allow a host with FETCH_ALLOW_HOSTS)."
            )
        if str(ip) not in addresses:
            addresses.append(str(ip))
    if not addresses:
        raise UnreachableURL(f"The host {target.host!r} of {target.url} has no IPv4 or IPv6 address.")
    return addresses


def _time_left(deadline: float, cap: float = math.inf) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("total deadline passed")
    return min(left, cap)


@cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the system CA store costs milliseconds; one verified context serves every fetch.
    return ssl.create_default_context()


def _connect(
    target: _Target, addresses: list[str], policy: FetchPolicy, deadline: float, ssl_context: ssl.SSLContext
) -> socket.socket:
    """A socket to the first checked address that answers; numeric addresses, so no DNS lookup."""
    last_error: OSError | None = None
    for address in addresses:
        try:
            sock = socket.create_connection(
                (address, target.port), timeout=_time_left(deadline, policy.connect_timeout)
            )
        except OSError as err:
            last_error = err
            continue
        if target.scheme != "https":
            return sock
        try:
            sock.settimeout(_time_left(deadline, policy.connect_timeout))
            # The name, not the address, drives SNI and certificate verification.
            return ssl_context.wrap_socket(sock, server_hostname=target.host)
        except TimeoutError:
            sock.close()
            raise FetchTimeout(f"The TLS handshake with {target.host!r} ({address}) timed out.") from None
        except ssl.SSLCertVerificationError as err:
            sock.close()
            raise UnreachableURL(
                f"The TLS certificate of {target.host!r} could not be verified ({err.verify_message}); "
                "use a URL whose site has a valid certificate."
            ) from None
        except OSError as err:
            sock.close()
            raise UnreachableURL(f"The TLS handshake with {target.host!r} ({address}) failed ({err}).") from None
    if isinstance(last_error, TimeoutError):
        raise FetchTimeout(
            f"Connecting to {target.host!r} ({', '.join(addresses)}) port {target.port} timed out (limits: "
            f"{policy.connect_timeout:g} s to connect, {policy.total_timeout:g} s in all); the server is down "
            "or unreachable."
        )
    raise UnreachableURL(
        f"Could not connect to {target.host!r} ({', '.join(addresses)}) port {target.port} ({last_error})."
    )


class _DeadlineReader(RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # Per-read timeouts alone let a server that drips a byte at a time live forever.
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The connected socket as http.client sees it: each send and receive gets only the time left."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str) -> BufferedReader:
        return BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        # http.client closes the connection before the body is read when the server says
        # "Connection: close"; the real socket is closed by _exchange once it is done.
        pass


def _read_body(response: http.client.HTTPResponse, target: _Target, policy: FetchPolicy) -> bytes:
    if response.length is not None and response.length > policy.max_bytes:
        raise ImageTooLarge(
            f"{target.url} is {response.length} bytes (Content-Length), more than the limit of "
            f"{policy.max_bytes} bytes; send a smaller image."
        )
    chunks, received = [], 0
    # read1 returns what one receive brings, so the cap holds whatever the server claims.
    while chunk := response.read1(min(_CHUNK_SIZE, policy.max_bytes + 1 - received)):
        received += len(chunk)
        if received > policy.max_bytes:
            raise ImageTooLarge(
                f"{target.url} sent more than the limit of {policy.max_bytes} bytes; send a smaller image."
            )
        chunks.append(chunk)
    if response.length:
        raise UnreachableURL(
            f"{target.url} closed the connection after {received} bytes, {response.length} bytes short of "
            "its Content-Length."
        )
    return b"".join(chunks)


def _exchange(
    target: _Target, addresses: list[str], policy: FetchPolicy, deadline: float, ssl_context: ssl.SSLContext
) -> tuple[str | None, bytes, str]:
    """GET the target: (redirect location, b"", "") or (None, body, declared Content-Type)."""
    sock = _connect(target, addresses, policy, deadline, ssl_context)
    try:
        connection_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(target.host, target.port)
        connection.sock = _DeadlineSocket(sock, deadline)
        connection.request(
            "GET",
            target.request_target,
            headers={"User-Agent": policy.user_agent, "Accept": "image/*", "Connection": "close"},
        )
        response = connection.getresponse()
        location = response.getheader("Location")
        if response.status in _REDIRECT_STATUSES and location:
            return location, b"", ""
        if response.status >= 300:
            raise UpstreamHTTPError(
                f"{target.url} answered HTTP {response.status} {response.reason}; check that the URL points at "
                "an image that exists and is public."
            )
        return None, _read_body(response, target, policy), response.getheader("Content-Type", "")
    except TimeoutError:
        raise FetchTimeout(
            f"{target.url} did not finish sending within {policy.total_timeout:g} s; try an image on a faster host."
        ) from None
    except (OSError, http.client.HTTPException) as err:
        raise UnreachableURL(f"{target.url} did not give a valid HTTP response ({err!r}).") from None
    finally:
        sock.close()


# --- image type -----------------------------------------------------------------------------

_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniff_image_type(data: bytes) -> str | None:
    """The media type the bytes' magic number says, or None when they are no known image."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    # "BM" alone also starts text; the DIB header size after the file header confirms a bitmap.
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


# --- the entry point ------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str
    final_url: str


def fetch_image(
    url: Any,
    policy: FetchPolicy | None = None,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    deadline: float | None = None,
) -> FetchedImage:
    """Fetch the image at `url` under `policy`; raises a FetchError subclass for anything else.

    `resolver` has socket.getaddrinfo's signature (tests inject fake DNS answers); `ssl_context`
    replaces the system-trust default, e.g. for a private CA. `deadline` (time.monotonic()) ends the fetch
    sooner than the policy's total timeout would, for several fetches that share one.
    """
    policy = policy or FetchPolicy()
    resolver = resolver or socket.getaddrinfo
    ssl_context = ssl_context or _default_ssl_context()
    deadline = min(deadline or math.inf, time.monotonic() + policy.total_timeout)
    current, came_from = url, None
    for _hop in range(policy.max_redirects + 1):
        try:
            target = _parse_url(current)
            addresses = _checked_addresses(target, policy, resolver)
        except FetchError as err:
            if came_from is None:
                raise
            raise type(err)(f"{came_from} redirected to {current}, which was refused: {err.message}") from None
        location, body, declared_type = _exchange(target, addresses, policy, deadline, ssl_context)
        if location is None:
            media_type = sniff_image_type(body)
            if media_type is None:
                raise UnsupportedMediaType(
                    f"{target.url} is not a JPEG, PNG, GIF, WebP, BMP or TIFF image (Content-Type "
                    f"{declared_type or 'missing'!r}, {len(body)} bytes starting {body[:16]!r}); "
                    "send the address of the image file itself, not of a web page."
                )
            return FetchedImage(body, media_type, target.url)
        came_from, current = target.url, urljoin(target.url, location)
    raise TooManyRedirects(
        f"{url} redirected more than {policy.max_redirects} times (last to {current}); "
        "send the image's final address instead."
    )
