"""What agents say of themselves, and when each was last seen.

Each poll may carry ``presence`` (version, mode, callback address; see
docs/PROTOCOL.md). :func:`parse_presence` checks it; the store writes the
version, mode and callback only when they change. The last-seen time of
every call is kept here in memory (:class:`LastSeen`) and written in batches
by a timed task and at shutdown, so a poll does not write to the database
just to say the agent is alive. :func:`is_online` is the one rule for
"online" that ``client list`` shows.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import threading
from collections.abc import Mapping
from typing import Any

from scire_schema.protocol import AgentMode
from scire_server.exceptions import InvalidArgument, clip
from scire_server.store import AgentPresence

MAX_VERSION = 64  # characters of an agent's version (clients.agent_version)
MAX_CALLBACK = 255  # characters of host:port (clients.callback_address)
_VERSION_RE = re.compile(r"^[\x21-\x7e]+( [\x21-\x7e]+)*$")  # printable ASCII, single spaces
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


def parse_presence(value: Any) -> AgentPresence:
    """The ``presence`` struct of a poll, checked; unknown keys are ignored (a
    newer agent may say more), a missing key leaves that fact as it was."""
    if value is None:
        return AgentPresence()
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"presence must be a struct of version, mode and callback, not {clip(value)}"
        )
    version = value.get("version")
    if version is not None:
        if not isinstance(version, str) or not version:
            raise InvalidArgument(
                f"presence version must be a non-empty string, not {clip(version)}"
            )
        if len(version) > MAX_VERSION:
            raise InvalidArgument(
                f"presence version is {len(version)} characters long; at most {MAX_VERSION}"
            )
        if not _VERSION_RE.fullmatch(version):
            raise InvalidArgument(f"presence version {clip(version)} must be printable ASCII")
    mode = value.get("mode")
    if mode is not None and mode not in tuple(AgentMode):
        raise InvalidArgument(
            f"presence mode {clip(mode)} is not one of {', '.join(m.value for m in AgentMode)}"
        )
    callback = value.get("callback")
    if callback is not None:
        if not isinstance(callback, str):
            raise InvalidArgument(
                f'presence callback must be a host:port string or "", not {clip(callback)}'
            )
        if callback:
            split_callback(callback)
    return AgentPresence(version, str(mode) if mode is not None else None, callback)


def split_callback(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as (host, port), or
    ``InvalidArgument`` saying what is wrong with it."""
    if len(text) > MAX_CALLBACK:
        raise InvalidArgument(f"callback address is longer than {MAX_CALLBACK} characters")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise InvalidArgument(f"callback {clip(text)} is not host:port")
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument(f"callback {clip(text)}: the port must be a number from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(f"callback {clip(text)}: an IPv6 address goes in [brackets]")
        host = host[1:-1]
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(
                f"callback {clip(text)}: {clip(host)} is not an IPv6 address"
            ) from None
        _check_address(text, address)
        return host, int(port_text)
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        _check_host_name(text, host)
        return host, int(port_text)
    _check_address(text, address)
    return host, int(port_text)


def _check_host_name(text: str, host: str) -> None:
    if ":" in host:
        raise InvalidArgument(f"callback {clip(text)}: write an IPv6 address as [address]:port")
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise InvalidArgument(
            f"callback {clip(text)}: {clip(host)} is neither an IP address nor a host name"
        )
    if labels[-1].isdigit():
        raise InvalidArgument(f"callback {clip(text)}: {clip(host)} is not an IPv4 address")


def _check_address(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    # The server connects to this address: one that names no single host is a mistake.
    if address.is_unspecified or address.is_multicast:
        raise InvalidArgument(
            f"callback {clip(text)}: {address} names no single host; give the address "
            "the server can reach the agent at"
        )


def is_online(
    last_seen: dt.datetime | None, now: dt.datetime, poll_interval: int, offline_after_polls: int
) -> bool:
    """Online: seen within ``offline_after_polls`` poll intervals."""
    if last_seen is None:
        return False
    return now - last_seen <= dt.timedelta(seconds=poll_interval * offline_after_polls)


class LastSeen:
    """The last time each client (by name) called or answered a push, kept in
    memory until the next flush."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unwritten: dict[str, dt.datetime] = {}
        self._latest: dict[str, dt.datetime] = {}

    def note(self, name: str, when: dt.datetime) -> None:
        with self._lock:
            if self._unwritten.get(name, when) <= when:
                self._unwritten[name] = when
            if self._latest.get(name, when) <= when:
                self._latest[name] = when

    def take(self) -> dict[str, dt.datetime]:
        """The times noted since the last ``take``, and forget them."""
        with self._lock:
            batch, self._unwritten = self._unwritten, {}
            return batch

    def give_back(self, batch: Mapping[str, dt.datetime]) -> None:
        """A batch whose write failed, kept for the next flush (newer times win)."""
        with self._lock:
            for name, when in batch.items():
                if self._unwritten.get(name, when) <= when:
                    self._unwritten[name] = when

    def latest(self, name: str) -> dt.datetime | None:
        """The newest time this daemon saw the client, written yet or not."""
        with self._lock:
            return self._latest.get(name)
