"""Imported by the local launcher's forkserver, first of its preloads (``local.PRELOAD``), and nowhere else:
importing it blocks SIGTERM in the importing thread, so every role forked from that thread starts with
SIGTERM blocked, before any thread of its own exists. SIGTERM then belongs to the one thread that waits
for it (``worker._exit_on_sigterm``), which runs the role's exit hooks; see ``worker.py``.
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
