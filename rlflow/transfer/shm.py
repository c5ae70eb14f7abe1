"""Same-host payloads through shared memory: the bytes skip the sockets, only their names travel.

Across machines a payload is one ZeroMQ frame: producer → server → consumer, two socket hops, each a
kernel copy in and out. On one host that is the cost that dominates, so when a client proves it shares
``/dev/shm`` with the server (it can read the probe file the server wrote there), a put writes its Arrow
IPC stream straight into a shared-memory file (the one copy there is, the same as encoding a frame) and
sends the file's name; the server and the consumers map the file and read the batch in place.

Lifetime (one owner at a time, so a file is unlinked exactly once):
- the producer creates ``rlflow-<producer pid>-<token>-<n>``; until the put succeeds it is the producer's
  to unlink; a failed put is unlinked by whichever side holds it when it fails;
- on put the server links it as ``rlflow-<server pid>-...`` and unlinks the old name (atomic, never
  replacing another payload; mappings are unaffected) and owns it; a forked producer gets its own token;
  it unlinks the file when the rows are freed and no lease that delivered it is outstanding; a consumer
  that mapped it keeps its pages until it drops the table (unlinked files live while mapped);
- a server sweeps files whose pid no longer runs when it starts, so a crash leaks nothing for long.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import stat
from pathlib import Path

import pyarrow as pa

from rlflow.transfer.lifetime import alive
from rlflow.transfer.wire import ProtocolError, read_one_batch

SHM_DIR = Path("/dev/shm")
PID_MAX = 1 << 22  # Linux's largest pid (pid_max's ceiling): a name with a larger one is no process's
NAME = re.compile(r"^rlflow-(\d+)-[0-9a-f]{16}-\d+$")
_counter = itertools.count()
_token = secrets.token_hex(8)  # this process's: names stay unique when the server renames them (``adopt``)


def _new_process() -> None:
    """A forked child is another producer: it gets its own token and counter (a child sharing its
    parent's would make the same names, which ``adopt`` would then map onto one file)."""
    global _counter, _token
    _counter, _token = itertools.count(), secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_process)


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def new_name(pid: int | None = None) -> str:
    return f"rlflow-{pid or os.getpid()}-{_token}-{next(_counter)}"


def path_of(name: str) -> Path:
    """The file of a payload name; refuses anything but our own flat names (no paths from the wire)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ProtocolError(f"shared-memory payload name {name!r} is not of the form rlflow-PID-TOKEN-N")
    return SHM_DIR / name


def stream_size(batch: pa.RecordBatch) -> int:
    """Bytes of ``batch`` as an IPC stream, measured without writing them."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.size()


def write(batch: pa.RecordBatch, size: int) -> str:
    """Write ``batch`` as an IPC stream into a new shared-memory file of ``size`` bytes; returns its name."""
    name = new_name()
    path = path_of(name)
    # Plain write() calls, not a writable mmap: the kernel copies each Arrow buffer straight into the
    # file's pages, where a fresh mapping would take one page fault per 4 KiB (measured 4x slower).
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with pa.PythonFile(os.fdopen(fd, "wb", buffering=0), mode="w") as f:
            with pa.ipc.new_stream(f, batch.schema) as writer:
                writer.write_batch(batch)
    except BaseException:
        unlink(name)
        raise
    if path.stat().st_size != size:
        unlink(name)
        raise RuntimeError(f"shared-memory payload {name}: wrote {path.stat().st_size} bytes, expected {size}")
    return name


def read(name: str) -> pa.RecordBatch:
    """Map a payload file and decode its one batch in place (zero copy), fully validated."""
    path = path_of(name)
    try:
        mm = pa.memory_map(str(path))
    except FileNotFoundError:
        raise ProtocolError(f"shared-memory payload {name} is gone (freed, or never written)") from None
    return read_one_batch(mm, f"shared-memory payload {name}")


def adopt(name: str, owner_pid: int) -> tuple[str, int]:
    """Rename a producer's payload file as the server's own; returns the new name and the file's size.

    Only a plain file of this process's user with no other name is adopted: the name is linked as it is
    (a symlink is never followed: a bus run as root must not serve a file its producer could not read),
    then opened without following links and checked with fstat. A file that fails is refused and left
    to its producer."""
    old = path_of(name)
    new = re.sub(r"^rlflow-\d+-", f"rlflow-{owner_pid}-", name)
    try:  # unlike a rename, a link never replaces a payload already adopted under that name
        os.link(old, path_of(new), follow_symlinks=False)
    except FileNotFoundError:
        raise ProtocolError(f"shared-memory payload {name} does not exist") from None
    except FileExistsError:
        raise ProtocolError(f"shared-memory payload {name}: the server already holds one named {new}") from None
    try:
        why, size = _not_ours(path_of(new), links=2)  # its producer's name and ours
    except OSError as e:  # a symlink (ELOOP under O_NOFOLLOW), a fifo (O_NONBLOCK: no hang), gone
        why, size = f"cannot be opened as a plain file ({e.strerror})", 0
    if why is not None:
        os.unlink(path_of(new))
        raise ProtocolError(f"shared-memory payload {name} {why}: refused")
    os.unlink(old)
    return new, size


def _not_ours(path: Path, links: int) -> tuple[str | None, int]:
    """(why the file at ``path`` is not a payload this process may adopt, or None; its size)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return "is not a plain file", 0
    if st.st_uid != os.geteuid():
        return f"belongs to user {st.st_uid}, not to this process's {os.geteuid()}", 0
    if st.st_nlink != links:
        return f"has {st.st_nlink - links + 1} names (a payload has one)", 0
    return None, st.st_size


def unlink(name: str) -> None:
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        pass  # already gone: unlinking is idempotent by design


def write_probe(pid: int) -> tuple[str, str]:
    """A file only a process on this host (same /dev/shm) can read: (name, secret content)."""
    name, secret = new_name(pid), secrets.token_hex(16)
    path_of(name).write_text(secret)
    return name, secret


def can_read_probe(name: str, secret: str) -> bool:
    try:
        return path_of(name).read_text() == secret
    except (OSError, ProtocolError):
        return False


def sweep_dead() -> int:
    """Unlink this user's payload files whose owning process no longer exists; returns how many.

    Never raises on one file: another user's leftovers (on a shared host), a name whose pid no process
    can have, a file that vanished meanwhile are all skipped, so no file in /dev/shm, made by accident or
    on purpose, keeps a bus from starting."""
    if not available():
        return 0
    removed = 0
    for path in SHM_DIR.glob("rlflow-*"):
        m = NAME.match(path.name)
        try:
            pid = int(m.group(1)) if m else 0
            if not m or pid > PID_MAX or path.lstat().st_uid != os.geteuid() or alive(pid):
                continue
            path.unlink()
            removed += 1
        except (OSError, ValueError, OverflowError):  # gone meanwhile, not ours to remove, a pid out of range
            continue
    return removed

