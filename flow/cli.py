"""The ``rlflow`` command: ``rlflow bus ...`` for the transfer-queue bus; the training app joins it next."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bus"]:
        from transfer.cli import main as bus_main

        return bus_main(argv[1:])
    print("usage: rlflow bus {serve,stats,keygen,demo} ...\n"
          "The training job (`rlflow [overrides]`) is not built yet; `rlflow bus demo` shows the bus.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
