"""Where the model tier is: its name looked up again every few seconds, so the gateway follows the model pods.

gRPC's own DNS resolver looks a name up again only when a connection breaks, and then at most every 30 s. A model
pod added by a scale-up stays unknown until some connection happens to end, and in a rollout the only pod the
gateway knows can stop before it has heard of the new one: every call then fails until the next lookup (a 16 s
outage on the CI cluster). So the gateway looks the name up itself, with the system resolver every other process
in the pod uses, and ModelClient moves to a channel for the new addresses whenever they change.

Only a name is looked up: `dns:///clothing-model-headless:8500` or `clothing-model:8500`. An address
(`10.0.0.1:8500`), a list (`ipv4:10.0.0.1:8500,10.0.0.2:8500`) or another scheme (`unix:`) is used as given.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import weakref
from dataclasses import dataclass

import grpc

from gateway_parts.metrics import MODEL_ADDRESSES

log = logging.getLogger("gateway")

# gRPC's target schemes other than dns: what they name is used as given.
OTHER_SCHEMES = ("ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")


@dataclass(frozen=True)
class Name:
    """A host name and port that a gRPC target names, to be looked up."""

    host: str
    port: int

    @property
    def authority(self) -> str:
        """What the calls carry as :authority, as they did when gRPC resolved the name itself."""
        return f"{self.host}:{self.port}"


def name_in(target: str) -> Name | None:
    """The name to look up in a gRPC target, or None where the target is to be used as given."""
    rest = target
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        if rest.startswith("//"):  # dns://[dns server]/host:port: a named DNS server stays gRPC's business
            server, _, rest = rest[2:].partition("/")
            if server:
                return None
    elif target.split(":", 1)[0] in OTHER_SCHEMES:
        return None
    host, _, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return Name(host, int(port))
    return None  # already an address


def look_up(name: Name) -> tuple[str, ...]:
    """The addresses the system resolver gives for the name, as sorted gRPC addresses (`10.0.0.1:8500`,
    `[fd00::1]:8500`); IPv4 ones only where there are both, since one gRPC target holds one family. Raises
    OSError when the lookup fails or gives nothing."""
    found = socket.getaddrinfo(name.host, name.port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in found if info[0] == socket.AF_INET}, key=ipaddress.ip_address)
    v6 = sorted({info[4][0] for info in found if info[0] == socket.AF_INET6}, key=ipaddress.ip_address)
    if v4:
        return tuple(f"{address}:{name.port}" for address in v4)
    if v6:
        return tuple(f"[{address}]:{name.port}" for address in v6)
    raise OSError(f"{name.host} has no address")


def target_for(addresses: tuple[str, ...]) -> str:
    """A gRPC target that names exactly these addresses (one family, as look_up gives them)."""
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


class FollowedChannel:
    """A gRPC channel to the addresses a name has now. The name is looked up every `every` seconds; when its
    addresses change, a channel to the new ones takes over as soon as it is ready (or at once if the old one is not
    ready either), and the old one is closed `retire_after` seconds later, when the calls on it are done.

    `wrap(channel)` makes what the callers use of a channel (ModelClient's stubs); `current` is that, for the
    channel of the moment. `answers(wrapped, seconds)` says whether a server behind it answers within that time.
    For a target that is not a name, or with `every` 0, there is one channel, on the target as given, and gRPC
    resolves it as it would."""

    def __init__(self, target: str, options: list, wrap, answers, every: float = 2.0, retire_after: float = 30.0):
        self.target, self.options, self.wrap, self.answers = target, list(options), wrap, answers
        self.every, self.retire_after = every, retire_after
        self.name = name_in(target) if every > 0 else None
        self.addresses: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # the last lookup failed (said once, not every few seconds)
        if self.name is not None:
            with contextlib.suppress(OSError):  # not there yet: gRPC's own resolver says so on each call until it is
                self.addresses = look_up(self.name)
            log.info("model tier %s at %s", self.name.authority, _shown(self.addresses))
            MODEL_ADDRESSES.set(len(self.addresses))
        self._channel = self._open(target_for(self.addresses) if self.addresses else target)
        self._current = wrap(self._channel)

    @property
    def current(self):
        if self.name is not None and self._thread is None:
            self._start()
        return self._current

    def _open(self, target: str) -> grpc.Channel:
        authority = [("grpc.default_authority", self.name.authority)] if self.name and target != self.target else []
        return grpc.insecure_channel(target, options=self.options + authority)

    def _start(self) -> None:
        """The lookups, in a thread of this process (started at first use: after gunicorn forked the worker)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_follow, args=(weakref.ref(self), self._closed, self.every), name="model-lookup", daemon=True
                )
                self._thread.start()

    def look_again(self) -> None:
        try:
            addresses = look_up(self.name)
        except OSError as error:  # scaled to zero, or DNS down: keep calling what was there
            if not self._failing:
                log.warning(
                    "model tier %s: lookup failed (%s); calling %s", self.name.authority, error, _shown(self.addresses)
                )
            self._failing = True
            return
        self._failing = False
        if addresses != self.addresses:
            self._use(addresses)

    def _use(self, addresses: tuple[str, ...]) -> None:
        channel = self._open(target_for(addresses))
        wrapped = self.wrap(channel)
        if not self.answers(wrapped, READY_WAIT) and self.answers(self._current, READY_WAIT):
            channel.close()  # the old channel still works: the new addresses are tried again at the next lookup
            return
        log.info("model tier %s at %s (was %s)", self.name.authority, ", ".join(addresses), _shown(self.addresses))
        old, self._channel, self._current, self.addresses = self._channel, channel, wrapped, addresses
        MODEL_ADDRESSES.set(len(addresses))
        retire = threading.Timer(self.retire_after, old.close)
        retire.daemon = True
        retire.start()

    def close(self) -> None:
        self._closed.set()
        self._channel.close()


# How long a server behind new addresses may take to answer before they are kept waiting (if the old ones answer).
READY_WAIT = 2.0


def _follow(follower: weakref.ref, closed: threading.Event, every: float) -> None:
    """Look the name up every `every` seconds until the FollowedChannel is closed or gone."""
    while not closed.wait(every):
        current = follower()
        if current is None:
            return
        try:
            current.look_again()
        except Exception:  # a lookup must never end the thread: the next one may work
            log.exception("model tier %s: looking up its addresses failed", current.target)
        del current


def _shown(addresses: tuple[str, ...]) -> str:
    return ", ".join(addresses) if addresses else "none known"
