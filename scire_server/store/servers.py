"""The daemons sharing the database: one ``servers`` row per instance key,
with its heartbeat."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from scire_server.exceptions import InstanceConflict
from scire_server.models import Server
from scire_server.states import ServerState
from scire_server.store.database import Database, row_dict, utcnow

SERVER_FIELDS = ("instance_key", "hostname", "pid", "url", "state", "started_at", "heartbeat_at")


class Servers:
    """This daemon's row, and the list of all of them."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def start(
        self,
        instance_key: str,
        hostname: str,
        pid: int,
        url: str,
        stale_after: int,
        is_alive: Callable[[int], bool],
    ) -> dict[str, Any]:
        """Register this daemon, or refuse with ``InstanceConflict`` when another live
        one holds the key.

        ``is_alive(pid)`` says whether a pid runs on this host: the previous
        life of this key on the same host, when its process is gone, need not
        wait for its heartbeat to go stale.
        """
        now = utcnow()
        with self.db.tx() as session:
            row = session.scalars(select(Server).where(Server.instance_key == instance_key)).first()
            if row is None:
                row = Server(
                    instance_key=instance_key,
                    hostname=hostname,
                    pid=pid,
                    url=url,
                    state=ServerState.RUNNING.value,
                    started_at=now,
                    heartbeat_at=now,
                )
                session.add(row)
                session.flush()
                self.db.server_id = row.id
                return {"previous_state": None, "server_id": row.id}
            fresh = row.heartbeat_at > now - dt.timedelta(seconds=stale_after)
            same_host_dead = row.hostname == hostname and (row.pid == pid or not is_alive(row.pid))
            if row.state == ServerState.RUNNING and fresh and not same_host_dead:
                raise InstanceConflict(
                    f"instance key {instance_key!r} is held by a live daemon "
                    f"(pid {row.pid} on {row.hostname}, heartbeat {row.heartbeat_at:%H:%M:%S} UTC); "
                    "give this daemon its own instance_key or stop the other one"
                )
            previous = {
                "previous_state": row.state,
                "previous_pid": row.pid,
                "previous_host": row.hostname,
            }
            row.hostname, row.pid, row.url = hostname, pid, url
            row.state, row.started_at, row.heartbeat_at = ServerState.RUNNING.value, now, now
            self.db.server_id = row.id
            return previous | {"server_id": row.id}

    def heartbeat(self) -> None:
        """Tell the other daemons this one is alive."""
        with self.db.tx() as session:
            session.execute(
                update(Server).where(Server.id == self.db.server_id).values(heartbeat_at=utcnow())
            )

    def stop(self) -> None:
        """Mark this daemon's row ``stopped``."""
        with self.db.tx() as session:
            session.execute(
                update(Server)
                .where(Server.id == self.db.server_id)
                .values(state=ServerState.STOPPED.value, heartbeat_at=utcnow())
            )

    def listing(self) -> list[dict[str, Any]]:
        """Every daemon's row."""
        with self.db.tx(write=False) as session:
            rows = session.scalars(select(Server).order_by(Server.id)).all()
            return [row_dict(r, *SERVER_FIELDS) for r in rows]
