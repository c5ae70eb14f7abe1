"""The entry point of every role process: connect, build the RoleContext, run the role's loop.

Shutdown is a designed path: the launcher sends SIGTERM and the process exits at once with status 0,
wherever its loop is (a blocking bus wait included). Exiting on the spot is safe because a role owns
nothing that outlives it: rows it took and did not ack return to the bus when their lease ends, its
unfinished shared-memory payloads are swept by the bus (their writer pid is dead), and its sockets die
with it. (Raising an exception from the handler instead was tried: when the signal lands inside a
ZeroMQ destructor the exception is swallowed and the role keeps running.) SIGINT is ignored here: a Ctrl-C in the terminal
reaches the whole process group, and the launcher alone decides the order things stop in. On Linux a
role also gets SIGTERM when the launcher dies (PR_SET_PDEATHSIG), so no role outlives its launcher.

Any other exception is reported to the launcher with its traceback (kind ``failed``) and exits 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback

PR_SET_PDEATHSIG = 1


def _on_sigterm(signum, frame):
    os._exit(0)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:  # no libc.so.6 (musl): the launcher's own shutdown still stops roles
            pass


def role_main(role: str, replica: int, role_cfg, extra: dict, spec: dict) -> None:
    """Process target. ``spec``: bus, weights, control addresses, model_path, run_dir, seed, waits, threads."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != spec["launcher_pid"]:  # the launcher died before the death signal was armed
        return
    import zmq

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)  # let the last report (a traceback) reach the launcher
    push.connect(spec["control"])

    def report(kind: str, **data) -> None:
        try:
            push.send_json({"role": role, "replica": replica, "kind": kind, "pid": os.getpid(), **data},
                           zmq.NOBLOCK)
        except zmq.Again:  # the launcher is not reading (gone): nothing to tell
            pass

    bus = None
    try:
        import torch

        from roles.interfaces import RoleContext
        from transfer import BusClient

        torch.set_num_threads(spec["threads"])
        bus = BusClient(spec["bus"])
        ctx = RoleContext(bus=bus, weights_address=spec["weights"], model_path=spec["model_path"], report=report,
                          run_dir=spec["run_dir"], replica=replica, seed=spec["seed"] + replica,
                          wait_seconds=spec["wait_seconds"], lease_seconds=spec["lease_seconds"])
        _quiet_libraries()
        module = __import__(f"roles.{role}", fromlist=["serve"])
        module.serve(role_cfg, ctx, **extra)
    except BaseException:
        report("failed", traceback=traceback.format_exc())
        push.close()
        sys.exit(1)
    finally:
        if bus is not None:
            bus.close()
    push.close()


def _quiet_libraries() -> None:
    """Loading bars of transformers would repeat once per role process; the launcher shows progress."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
