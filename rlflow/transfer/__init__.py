"""transfer — a transfer-queue bus: Arrow record batches over ZeroMQ, knowing nothing about RL.

Read in this order: ``wire.py`` (frames and errors), ``store.py`` (rows × columns, leases, capacity),
``server.py`` (the ROUTER loop and parked waits), ``client.py`` (the API), ``shm.py`` (same-host payloads), ``security.py`` (CURVE),
``access.py`` (a credential per client, and what it grants).

The names below are imported on first use (PEP 562), so a process that needs only ``lifetime`` (an
environment worker, a reward sandbox) does not pay for pyarrow.
"""

from importlib import import_module

_WHERE = {"Grant": "access", "BusClient": "client", "Delivery": "client", "BusServer": "server",
          "ServerConfig": "server", "ServerProcess": "server", "serve_in_thread": "server", "spawn_server": "server",
          **{name: "wire" for name in ("GROUP", "UID", "BusError", "BusTimeout", "CapacityError", "LeaseExpired",
                                       "ProtocolError", "SchemaError", "Unauthorized")}}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rlflow.transfer' has no attribute {name!r}")
    value = getattr(import_module(f"rlflow.transfer.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
