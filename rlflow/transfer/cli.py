"""``rlflow bus ...``: serve a bus, inspect one, make CURVE keys, run the demo.

    rlflow bus serve --address tcp://127.0.0.1:5555        # a standalone bus
    rlflow bus stats tcp://127.0.0.1:5555                  # rows, bytes, consumers, leases, waiting calls
    rlflow bus keygen ./keys                               # CURVE keypairs for server and clients
    rlflow bus demo                                        # producer → scorer → consumer, in 4 processes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _serve(args: argparse.Namespace) -> int:
    from rlflow.transfer.server import BusServer, ServerConfig, serve_until_sigterm

    config = ServerConfig(address=args.address, capacity_rows=args.capacity_rows,
                          capacity_bytes=args.capacity_bytes, keys_dir=args.keys_dir, insecure=args.insecure)
    server = BusServer(config)
    try:
        serve_until_sigterm(server, lambda: print(f"bus listening on {server.address}" +
                                                  (" (CURVE)" if args.keys_dir else ""), flush=True))
    except KeyboardInterrupt:
        pass
    return 0


def _stats(args: argparse.Namespace) -> int:
    from rlflow.transfer.client import BusClient

    with BusClient(args.address, keys_dir=args.keys_dir, connect_timeout=args.timeout) as bus:
        stats = bus.stats(timeout=args.timeout)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print_stats(stats)
    return 0


def print_stats(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False)  # names and addresses are printed as they are
    console.print(f"bus {s['address']}  rows {s['rows']}/{s['capacity_rows']}  "
                  f"bytes {s['bytes']:,}/{s['capacity_bytes']:,}  groups {s['groups']}  "
                  f"segments {s['segments']}  leases {s['leases']}  errors {s['errors']}", style="bold")
    console.print(f"in: {s['rows_in']} rows, {s['cells_in']} cells ({s['cells_skipped']} repeated cells "
                  f"skipped) in {s['puts']} puts; freed {s['rows_freed']} rows; expired leases "
                  f"{s['leases_expired']}; release after {s['release_after'] or '(clear only)'}")
    table = Table("consumer", "columns", "ready", "leased", "delivered", "acked", "redelivered")
    for name, c in s["consumers"].items():
        table.add_row(name, ",".join(c["columns"]), str(c["ready"]), str(c["leased"]), str(c["delivered"]),
                      str(c["acked"]), str(c["redelivered"]))
    console.print(table)
    for w in s["waiting_gets"]:
        console.print(f"waiting: get {w['n']} rows of {w['columns']} for {w['consumer']!r} for {w['waited_s']}s")
    for w in s["waiting_reserves"]:
        console.print(f"waiting: producer reserving {w['rows']} rows / {w['bytes']:,} bytes for {w['waited_s']}s")
    unlisted = s["waiting_gets_total"] + s["waiting_reserves_total"] - len(s["waiting_gets"]) - len(s["waiting_reserves"])
    if unlisted:
        console.print(f"waiting: {unlisted} more calls")
    if s["dropped_replies"]:
        console.print(f"dropped replies (peers gone or not reading): {s['dropped_replies']}")


def _keygen(args: argparse.Namespace) -> int:
    from rlflow.transfer.security import keygen

    d = keygen(args.dir)
    print(f"CURVE keys in {d}: serve with --keys-dir {d}; clients need server.key and client.key_secret; "
          f"add more client public keys to {d / 'authorized'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlflow.transfer.demo import run_demo

    return run_demo(rows=args.rows, group_size=args.group_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlflow bus", description="The rlflow transfer-queue bus.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run a bus server in the foreground")
    p.add_argument("--address", default="tcp://127.0.0.1:5555")
    p.add_argument("--capacity-rows", type=int, default=65536)
    p.add_argument("--capacity-bytes", type=int, default=2 * 1024**3)
    p.add_argument("--keys-dir", default=None, help="CURVE key directory (required beyond loopback)")
    p.add_argument("--insecure", action="store_true", help="listen beyond loopback without CURVE")
    p.set_defaults(fn=_serve)
    p = sub.add_parser("stats", help="print what a bus holds: rows, bytes, consumers, leases, waiting calls")
    p.add_argument("address")
    p.add_argument("--keys-dir", default=None)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    p.set_defaults(fn=_stats)
    p = sub.add_parser("keygen", help="create CURVE keypairs for a server and its clients")
    p.add_argument("dir")
    p.set_defaults(fn=_keygen)
    p = sub.add_parser("demo", help="producer → scorer → consumer through a bus, in separate processes")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--group-size", type=int, default=8)
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
