"""Who may do what on a bus: a credential per client, and what it grants.

A bus started with ``ServerConfig.grants`` (token -> ``Grant``) serves only what each connection's
grant allows. A client names its token in its ``hello``; the server binds the grant to that
connection's routing id (ZeroMQ assigns it, and a peer cannot pick one ZeroMQ reserves for itself,
so no other connection can speak with that grant). Before a valid hello a connection may only say
hello and read ``stats``; after it, every request is checked against the grant:

- ``get``, ``ack``, ``nack``, ``renew`` (and an ack riding on a get): the consumer name is one of the
  grant's ``consumers``, and a get reads only the grant's ``read`` columns (its ``where`` too);
- ``put``: only the grant's ``write`` columns, and new rows (a batch with the group column) only with
  ``create``; ``reserve``: only a grant that can put;
- ``declare``, ``release``, ``clear``: only an ``admin`` grant (what decides the bus's schema and
  frees or hands back other clients' rows).

Without grants (``grants=None``: a bus of one's own, the tests of the bus itself) every connection may
do everything, as a bus on a private socket always could. The checks are per request, never per row:
they cost the same for a batch of one row and of a million. What a grant allows is the caller's
business (``roles/schema.py`` says it for rlflow's roles): this module knows nothing of RL.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlflow.transfer.wire import Unauthorized

GROUP_COLUMN = "group_id"  # a put carrying it creates rows (transfer/store.py)
OPEN_OPS = ("hello", "stats")  # what a connection without a grant may do


@dataclass(frozen=True)
class Grant:
    """What one credential allows on a bus (see the module docstring)."""

    name: str  # who holds it, for messages: "rollout", "feeder", ...
    consumers: tuple[str, ...] = ()  # consumer names it may get, ack, nack and renew as
    read: tuple[str, ...] = ()  # columns it may get
    write: tuple[str, ...] = ()  # columns it may put
    create: bool = False  # may put new rows
    admin: bool = False  # may do anything: declare, release, clear included

    def check(self, op: str, header: dict) -> None:
        """Raise Unauthorized unless this grant allows request ``op`` (its columns are checked by
        ``check_put`` once the batch is read)."""
        if self.admin or op in OPEN_OPS:
            return
        if op in ("get", "ack", "nack", "renew"):
            self._consumer(op, header.get("consumer"))
            if op == "get":
                ack = header.get("ack")
                if isinstance(ack, dict):
                    self._consumer("ack", ack.get("consumer"))
                wanted = list(header.get("columns") or [])
                wanted += [c[0] for c in header.get("where") or [] if isinstance(c, list) and c]
                self._columns("read", [c for c in wanted if c != GROUP_COLUMN], self.read)
            return
        if op in ("put", "reserve") and (self.write or self.create):
            return
        raise Unauthorized(f"{self.name} may not {op}: {self._allowed()}")

    def check_put(self, columns: list[str]) -> None:
        """Raise Unauthorized unless this grant may put a batch of ``columns`` (uid and group id aside)."""
        if self.admin:
            return
        if GROUP_COLUMN in columns and not self.create:
            raise Unauthorized(f"{self.name} may not create rows (a put with {GROUP_COLUMN!r}): {self._allowed()}")
        self._columns("write", [c for c in columns if c not in ("uid", GROUP_COLUMN)], self.write)

    def _consumer(self, op: str, consumer) -> None:
        if consumer not in self.consumers:
            raise Unauthorized(f"{self.name} may not {op} as consumer {str(consumer)[:40]!r}: {self._allowed()}")

    def _columns(self, what: str, columns: list, allowed: tuple[str, ...]) -> None:
        refused = sorted({str(c)[:40] for c in columns} - set(allowed))
        if refused:
            raise Unauthorized(f"{self.name} may not {what} {', '.join(refused)}: {self._allowed()}")

    def _allowed(self) -> str:
        return (f"it may use consumers {list(self.consumers)}, read {list(self.read)}, write {list(self.write)}"
                + (", create rows" if self.create else ""))
