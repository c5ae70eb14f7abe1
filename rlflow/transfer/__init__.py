"""transfer — a transfer-queue bus: Arrow record batches over ZeroMQ, knowing nothing about RL.

Read in this order: ``wire.py`` (frames and errors), ``store.py`` (rows × columns, leases, capacity),
``server.py`` (the ROUTER loop and parked waits), ``client.py`` (the API), ``shm.py`` (same-host payloads), ``security.py`` (CURVE),
``access.py`` (a credential per client, and what it grants).
"""

from rlflow.transfer.access import Grant
from rlflow.transfer.client import BusClient, Delivery
from rlflow.transfer.server import BusServer, ServerConfig, ServerProcess, serve_in_thread, spawn_server
from rlflow.transfer.wire import (GROUP, UID, BusError, BusTimeout, CapacityError, LeaseExpired, ProtocolError, SchemaError,
                                  Unauthorized)

__all__ = ["Grant", "BusClient", "Delivery", "BusServer", "ServerConfig", "ServerProcess", "serve_in_thread",
           "spawn_server", "GROUP", "UID", "BusError", "BusTimeout", "CapacityError", "LeaseExpired", "ProtocolError",
           "SchemaError", "Unauthorized"]
