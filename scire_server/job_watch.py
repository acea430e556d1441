"""``scire-admin job watch``: a job's progress across its hosts until all are final.

Three renderings of the same snapshots: a live ``rich`` view on a terminal
(progress bar, counts, the slowest hosts), one plain line per change when
stdout is not a terminal, and one JSON object per change with ``--json``.
A "change" is any host changing state; the elapsed times of the slowest hosts
move every second but are not changes.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from scire_schema.exitcodes import ExitCode

POLL_INTERVAL = 0.5  # seconds between two looks at the job
SLOWEST_SHOWN = 5  # hosts in the "slowest" list

#: The columns of the view, and the assignment states each one counts.
COLUMNS: dict[str, tuple[str, ...]] = {
    "pending": ("pending", "lost"),
    "sent": ("sent", "acknowledged"),
    "running": ("running",),
    "succeeded": ("succeeded",),
    "failed": ("failed", "timed_out", "expired", "cancelled"),
    "denied": ("denied",),
}
_COLUMN_OF = {state: column for column, states in COLUMNS.items() for state in states}
_ACTIVE_COLUMNS = ("pending", "sent", "running")
_STYLE = {
    "pending": "yellow",
    "sent": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "denied": "magenta",
}


def snapshot(detail: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """What the view shows of ``job_show``'s answer: counts, progress, the slowest hosts."""
    now = now or dt.datetime.now(dt.UTC)
    counts = dict.fromkeys(COLUMNS, 0)
    waiting = []
    for a in detail["assignments"]:
        column = _COLUMN_OF.get(a["state"], "pending")
        counts[column] += 1
        if column in _ACTIVE_COLUMNS:
            since = a.get("started_at") or a.get("sent_at") or detail["created_at"]
            waiting.append(
                {
                    "client": a["client"],
                    "state": a["state"],
                    "since": since,
                    "seconds": max(0.0, (now - _utc(since)).total_seconds()),
                }
            )
    waiting.sort(key=lambda w: (-w["seconds"], w["client"]))
    total = len(detail["assignments"])
    return {
        "job_id": detail["id"],
        "name": detail["name"],
        "state": detail["state"],
        "total": total,
        "done": total - sum(counts[c] for c in _ACTIVE_COLUMNS),
        "counts": counts,
        "slowest": waiting[:SLOWEST_SHOWN],
        "hosts": {a["client"]: a["state"] for a in detail["assignments"]},
    }


def _utc(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def plain_line(snap: dict[str, Any]) -> str:
    counts = ", ".join(f"{c} {n}" for c, n in snap["counts"].items())
    line = f"job {snap['job_id']}: {snap['done']}/{snap['total']} final ({counts})"
    if snap["slowest"]:
        slow = snap["slowest"][0]
        line += f"; slowest {slow['client']} {slow['state']} {_duration(slow['seconds'])}"
    return line


def json_line(snap: dict[str, Any]) -> str:
    # "seconds" moves with the clock; a line per change carries what changed.
    slowest = [{k: w[k] for k in ("client", "state", "since")} for w in snap["slowest"]]
    return json.dumps(snap | {"slowest": slowest}, sort_keys=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(snap: dict[str, Any]) -> Any:
    """The rich view of one snapshot."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    title = Text.assemble(
        (f"job {snap['job_id']} ({snap['name']})", "bold"),
        f"  {snap['state']}  {snap['done']}/{snap['total']} hosts final",
    )
    # A grid row of its own: a bare ProgressBar ends no line, so what follows would share it.
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(snap["total"], 1), completed=snap["done"], width=50),
        f"{100 * snap['done'] // max(snap['total'], 1)}%",
    )
    counts = Text("  ").join(
        Text(f"{column} {count}", style=_STYLE[column] if count else "dim")
        for column, count in snap["counts"].items()
    )
    parts: list[Any] = [title, bar, counts]
    if snap["slowest"]:
        slow = Table(title="slowest hosts", title_justify="left", box=None, pad_edge=False)
        slow.add_column("HOST")
        slow.add_column("STATE")
        slow.add_column("FOR", justify="right")
        for w in snap["slowest"]:
            slow.add_row(w["client"], w["state"], _duration(w["seconds"]))
        parts.append(slow)
    return Group(*parts)


def watch(
    job_id: int,
    fetch: Callable[[], dict[str, Any]],
    *,
    as_json: bool,
    timeout: float | None,
    is_final: Callable[[dict[str, Any]], bool],
    exit_code: Callable[[dict[str, Any], float | None], ExitCode],
) -> ExitCode:
    """Follow the job until ``is_final`` or ``timeout``; then ``exit_code``'s answer."""
    deadline = None if timeout is None else time.monotonic() + timeout
    live = not as_json and sys.stdout.isatty()
    detail = fetch()
    if live:
        detail = _watch_live(detail, fetch, deadline, is_final)
    else:
        last: dict[str, str] | None = None
        while True:
            snap = snapshot(detail)
            if snap["hosts"] != last:
                print(json_line(snap) if as_json else plain_line(snap), flush=True)
                last = snap["hosts"]
            if is_final(detail) or _past(deadline):
                break
            time.sleep(POLL_INTERVAL)
            detail = fetch()
    return exit_code(detail, timeout)


def _watch_live(
    detail: dict[str, Any],
    fetch: Callable[[], dict[str, Any]],
    deadline: float | None,
    is_final: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    from rich.live import Live

    with Live(render(snapshot(detail)), refresh_per_second=4, transient=False) as view:
        while not is_final(detail) and not _past(deadline):
            time.sleep(POLL_INTERVAL)
            detail = fetch()
            view.update(render(snapshot(detail)))
    return detail


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline
