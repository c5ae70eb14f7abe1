"""Process lifetime (transfer/lifetime.py): exit hooks run once, fully, whichever thread runs them."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import threading
from rlflow.transfer.lifetime import at_exit, run_exit_hooks

entered, release, log = threading.Event(), threading.Event(), []
at_exit(lambda: log.append("older hook"))
at_exit(lambda: (entered.set(), release.wait(10), log.append("slow hook")))
first = threading.Thread(target=run_exit_hooks)
first.start()
entered.wait(10)
second = threading.Thread(target=lambda: (run_exit_hooks(), log.append("second caller returned")))
second.start()
second.join(0.5)
print("second returned while a hook ran:", not second.is_alive())
release.set()
first.join(10)
second.join(10)
print(log)
"""


def test_a_second_caller_of_the_exit_hooks_returns_only_once_every_hook_has_run():
    # The SIGTERM thread of a role runs the hooks and exits the process: it must not cut short the
    # main thread's run of them (the last heartbeat, with the last timeline spans, was lost that way).
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines() == ["second returned while a hook ran: False",
                                "['slow hook', 'older hook', 'second caller returned']"]
