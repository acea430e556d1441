"""Refused calls from peers the server does not know, counted instead of
written one by one.

Anyone who can reach the port can make the server refuse a call, as often as
they like. A log line and an audit row for each would let a stranger fill the
disk and the database, so a refusal without a known identity (no or an unknown
certificate, or a refused open method) is counted here: the first one from
each address in an interval is logged, the rest only counted, and once per
interval the API writes one summary (a log line and one audit row, "N
anonymous refusals from M addresses"). Refusals of a known identity (a
revoked client, a user who is not an administrator) are not counted here: they
are logged and audited under that identity.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

#: Addresses tracked one by one per interval; refusals from more are only counted.
MAX_ADDRESSES = 10_000
#: Addresses named in a summary, those with the most refusals first.
TOP_ADDRESSES = 5


@dataclasses.dataclass(frozen=True)
class Summary:
    """The anonymous refusals of one interval."""

    since: dt.datetime  # naive UTC
    refusals: int
    addresses: int  # distinct addresses, at most MAX_ADDRESSES (+1 for "more")
    logged: int  # refusals that got a log line of their own
    top: list[tuple[str, int]]

    def text(self) -> str:
        more = "+" if self.addresses > MAX_ADDRESSES else ""
        busiest = ", ".join(f"{address} ({count})" for address, count in self.top)
        return (
            f"{self.refusals} anonymous refusal(s) from {min(self.addresses, MAX_ADDRESSES)}{more} "
            f"address(es) since {self.since:%Y-%m-%d %H:%M:%S} UTC, "
            f"{self.refusals - self.logged} not logged one by one; most from {busiest}"
        )


class AnonymousRefusals:
    """Counts anonymous refusals per peer address, in memory, for one daemon."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._since = _utcnow()
        self._by_address: dict[str, int] = {}
        self._untracked = 0  # refusals from addresses beyond MAX_ADDRESSES
        self._logged = 0

    def note(self, address: str) -> bool:
        """Count one refusal from ``address``; True when it deserves a log line:
        the first from this address since the last summary."""
        with self._lock:
            count = self._by_address.get(address)
            if count is not None:
                self._by_address[address] = count + 1
                return False
            if len(self._by_address) >= MAX_ADDRESSES:
                self._untracked += 1
                return False
            self._by_address[address] = 1
            self._logged += 1
            return True

    def take(self) -> Summary | None:
        """The interval's summary (None when nothing was refused), and a new interval."""
        with self._lock:
            refusals = sum(self._by_address.values()) + self._untracked
            if not refusals:
                self._since = _utcnow()
                return None
            top = sorted(self._by_address.items(), key=lambda kv: (-kv[1], kv[0]))
            summary = Summary(
                since=self._since,
                refusals=refusals,
                addresses=len(self._by_address) + (1 if self._untracked else 0),
                logged=self._logged,
                top=top[:TOP_ADDRESSES],
            )
            self._reset()
            return summary


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
