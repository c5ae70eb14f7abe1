"""The entry point of every role replica: connect, build the RoleContext, run the role's loop.

``run_role`` is the replica itself, whoever hosts it: ``role_main`` (a process of the local launcher)
or a Ray actor (``flow/placement/ray_cluster.py``). CURVE keys, when the run listens beyond loopback, arrive in
the run's ``Wiring`` (``plan.py``) and stay in memory: nothing is written where the role runs, so a
replica killed outright leaves no key behind.

Shutdown is a designed path: the launcher sends SIGTERM (Ray: ``stop``, then a kill) and the process
exits at once, wherever its loop is (a blocking bus wait included), after the role's exit hooks
(``rlflow.transfer.lifetime.at_exit``: e.g. a server it launched; the last heartbeat, with the last
timeline spans); a thread of its own waits for the signal (``_exit_on_sigterm``).
Every other thread must block SIGTERM, or the kernel may hand it one that does not and the default
action kills the process without its hooks: the local launcher forks every role from a forkserver
that runs with SIGTERM blocked (a mask survives fork and exec), so even the threads made while its
arguments are unpickled block it. Exiting on the spot is safe because a role owns
nothing else that outlives it: rows it took and did not ack return to the bus (at once when the
launcher releases its leases, else when they end), its unfinished shared-memory payloads are swept by
the bus (their writer pid is dead), and its sockets die with it. SIGINT is ignored here: a Ctrl-C in
the terminal reaches the whole process group, and the launcher alone decides the order things stop in.
A local role also gets SIGTERM when the launcher dies (``lifetime.die_with``: its parent is the
forkserver, not the launcher), so no role outlives its launcher.

Any other exception is reported to the launcher with its traceback (kind ``failed``) and exits 1.

Liveness: a thread of its own sends a ``heartbeat`` every ``heartbeat_s`` over a socket of its own. A
process that is frozen (SIGSTOP, a debugger, a swapped-out host) or wedged with the GIL held sends
none, and the launcher's supervisor (``flow/placement/supervisor.py``) kills and restarts it. Every report carries
the replica's ``incarnation`` (restarts so far), so nothing a dead incarnation sent is mistaken for
its successor's. Leases it takes carry the holder name ``<role>-<replica>.<incarnation>``, which the
launcher hands back to the bus when the incarnation is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback

from rlflow.flow.placement.plan import ReplicaPlan
from rlflow.transfer.lifetime import die_with

def _exit_on_sigterm() -> None:
    """A thread that waits for SIGTERM (blocked in every other thread) and exits the process at once.

    A handler would run only when the main thread next executes Python code, which a blocking wait in C
    (a socket poll, a join at interpreter exit) can delay indefinitely; a signal the kernel hands to
    another thread does not even interrupt that wait. Waiting for it synchronously here has neither problem.
    """
    from rlflow.transfer.lifetime import run_exit_hooks

    signal.sigwait({signal.SIGTERM})
    run_exit_hooks()
    os._exit(0)


def _env_workers(role: str, wiring):
    """A rollout's environment workers as Ray actors when the run asks for them (flow/placement/ray_env.py)."""
    if role != "rollout" or wiring.env_actors is None:
        return None
    from rlflow.flow.placement.ray_env import RayEnvWorkers

    return RayEnvWorkers(wiring.env_actors, wiring.keys)


def role_main(plan: ReplicaPlan) -> None:
    """Process target of the local launcher: signals as the module docstring says, then ``run_role``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before any thread: all of them inherit it
    threading.Thread(target=_exit_on_sigterm, name="rlflow-sigterm", daemon=True).start()
    die_with(plan.wiring.launcher_pid)
    sys.exit(run_role(plan))


def run_role(plan: ReplicaPlan) -> int:
    """Run one role replica to its end; returns 0 when its loop returned, 1 after reporting a failure.

    The Ray launcher calls this inside a role actor; the local one inside ``role_main``.
    """
    import zmq

    role, replica, incarnation, wiring = plan.role, plan.replica, plan.incarnation, plan.wiring
    keys_dir = wiring.keys  # CurveKeys in memory (or None on one host): nothing written where the role runs
    # A context of its own, terminated at the end: that waits (up to the linger) until the last report, a
    # traceback, is out. A forked process ends in os._exit, which would drop what is still queued.
    reports_ctx = zmq.Context()
    push = _control_socket(wiring.control, keys_dir, linger_ms=2000, context=reports_ctx)
    stop_beating = threading.Event()
    from rlflow.roles.context import Timeline
    from rlflow.transfer.lifetime import at_exit

    timeline = Timeline()
    beats = threading.Thread(target=_heartbeat, args=(plan, keys_dir, timeline, stop_beating),
                             name="rlflow-heartbeat", daemon=True)
    beats.start()
    at_exit(lambda: (stop_beating.set(), beats.join(HEARTBEAT_JOIN_S)))  # also when stopped by SIGTERM

    credential = {"token": plan.bus_token} if plan.bus_token else {}  # the launcher believes only its role's

    def report(kind: str, **data) -> None:
        try:
            push.send_json({"role": role, "replica": replica, "kind": kind, "pid": os.getpid(),
                            "incarnation": incarnation, **data, **credential}, zmq.NOBLOCK)
        except zmq.Again:  # the launcher is not reading (gone): nothing to tell
            pass

    bus, code = None, 0
    try:
        import torch

        from rlflow.flow.placement.endpoints import make_endpoints
        from rlflow.roles import serve_function
        from rlflow.roles.context import RoleContext
        from rlflow.transfer import BusClient

        torch.set_num_threads(plan.threads)
        bus = BusClient(wiring.bus, keys_dir=keys_dir, holder=holder_name(role, replica, incarnation),
                        token=plan.bus_token)
        from rlflow.roles import schema
        from rlflow.transfer.channel import ChannelKey

        ctx = RoleContext(bus=bus, endpoints=make_endpoints(wiring.endpoints), keys_dir=keys_dir,
                          model_path=wiring.model_path, report=report, run_dir=wiring.run_dir, replica=replica,
                          seed=wiring.seed + replica, wait_seconds=wiring.wait_seconds,
                          lease_seconds=wiring.lease_seconds, timeline=timeline,
                          channel_key=ChannelKey(plan.channel_secret) if plan.channel_secret else None,
                          bounds=schema.limits(wiring.steps, vocab_size(wiring.model_path)),
                          env_workers=_env_workers(role, wiring))
        _quiet_libraries()
        serve_function(role)(plan.config, ctx, plan.args)
    except BaseException:
        report("failed", traceback=traceback.format_exc())
        code = 1
    finally:
        from rlflow.transfer.lifetime import run_exit_hooks

        run_exit_hooks()  # the first hook registered, so the last to run: the last heartbeat, with the last spans
        if bus is not None:
            bus.close()
        push.close()
        reports_ctx.term()
        sys.stdout.flush()  # what the role printed reaches its log (under Ray: the driver) before it is killed
        sys.stderr.flush()
    return code


HEARTBEAT_JOIN_S = 5.0  # bound on the heartbeat thread's last send (non-blocking) at a role's end


def vocab_size(model_path: str) -> int | None:
    """The model's number of token ids, from its config.json (None when it does not say)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def holder_name(role: str, replica: int, incarnation: int) -> str:
    """The name one incarnation of a replica's leases carry on the bus (see ``BusClient.release``)."""
    return f"{role}-{replica}.{incarnation}"


def _control_socket(address: str, keys_dir: str | None, linger_ms: int, context=None):
    import zmq

    sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, linger_ms)
    from rlflow.transfer.security import connect

    connect(sock, address, keys_dir)
    return sock


def _heartbeat(plan: ReplicaPlan, keys_dir: str | None, timeline, stop: threading.Event) -> None:
    """Tell the launcher this process is alive every ``heartbeat_s`` (a thread; its own socket); each beat
    carries the timeline spans the role recorded since the last one, and a last beat goes when ``stop`` is set."""
    import zmq

    # SIGTERM belongs to the thread that waits for it (_exit_on_sigterm), SIGINT to nobody here.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    # A context of its own: terminating it at the end waits (up to the linger) until the last beat is out,
    # even when SIGTERM's thread exits the process with os._exit right after.
    context = zmq.Context()
    sock = _control_socket(plan.wiring.control, keys_dir, linger_ms=1000, context=context)
    beat = {"role": plan.role, "replica": plan.replica, "kind": "heartbeat", "pid": os.getpid(),
            "incarnation": plan.incarnation}
    if plan.bus_token:
        beat["token"] = plan.bus_token
    try:
        while True:
            stopping = stop.wait(plan.wiring.heartbeat_s)
            try:
                sock.send_json({**beat, "spans": timeline.take(last=stopping), "spans_dropped": timeline.dropped},
                               zmq.NOBLOCK)
            except zmq.Again:  # the launcher is not reading: it learns of us when it does (those spans are lost)
                pass
            if stopping:
                return
    finally:
        sock.close()
        context.term()


def _quiet_libraries() -> None:
    """Loading bars of transformers would repeat once per role process; the launcher shows progress."""
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
