"""Run untrusted Python (model-generated code) in a constrained subprocess.

Layers, from strongest to weakest (none needs root; see docs/sandbox.md for what each one does
and does not isolate):

1. **User**: run as root, the program runs as `nobody` (Popen's `user=`, set in C between fork
   and exec), with no supplementary groups; it owns only its temporary directory.
2. **Namespaces** (`unshare -rn --pid --fork --kill-child`, where unprivileged user namespaces
   work): an empty network namespace (a down loopback: no connection leaves), and a pid
   namespace whose first process is the program, so when it dies or is killed on timeout the
   kernel kills every process it started, `setsid` children included; and, where mount
   namespaces work too, a read-only view of every mount but the work directory, locked in a
   nested namespace so the program cannot remount it writable (`_READ_ONLY_VIEW`).
3. **Resource limits** (`prlimit`, else `setrlimit` in the child before exec): address space
   (`memory_mb`), CPU seconds, file size (`max_file_mb`), processes and threads (`max_procs`
   above what the user runs already), no core dumps.
4. **Audit hook** (a `sys.addaudithook` prelude that cannot be removed): refuses writing,
   removing, renaming, linking or changing files outside the temporary directory (also through
   `dir_fd` and open descriptors), opening directories outside it, changing directory, starting
   processes (`os.system`, `subprocess`, `fork`, `exec*`, `posix_spawn`, and
   `_posixsubprocess.fork_exec`), `ctypes`/`cffi`, `sqlite3` (it writes files and loads native
   extensions), the `gc` referrer walks, and, without a network namespace, socket calls.
5. **Process**: a fresh `python -I -B` in its own session, in a fresh temporary directory
   (removed afterwards) with HOME/TMPDIR inside it and a scrubbed environment; output is read
   in bounded chunks (only `max_output` bytes of each stream are kept); on timeout the session
   and every descendant get SIGKILL.

Honest limits: reads are not confined (the program can read what its user can read: everything
world-readable; the mount view is read-only, not hidden); the audit hook guards against ordinary code, not a determined attacker with a
C-level escape. For hostile code, run this inside a container or VM as well. Example::

    r = run_python("print(sum(range(10)))", timeout=5)
    r.status, r.stdout          # ('ok', '45\\n')
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Installed before the untrusted program runs, in the sandbox's temporary directory (the cwd).
# The guard keeps its settings in a closure, not in module globals: the program can reach this
# module as `__main__`, but not the closure's cells.
_PRELUDE = r'''
import os, sys, pathlib

def _make_guard(root, deny_network):
    import os
    realpath, isdir, readlink, fsdecode = os.path.realpath, os.path.isdir, os.readlink, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    safe_path_types = (str, bytes, pathlib.PosixPath, pathlib.PurePosixPath)
    # event -> (path argument, its dir_fd argument or None) pairs
    path_events = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
        "os.link": ((0, 2), (1, 3)), "os.symlink": ((0, None), (1, 2)), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.truncate": ((0, None),), "os.utime": ((0, 3),), "shutil.rmtree": ((0, 1),),
        "shutil.copyfile": ((0, None), (1, None)), "shutil.copytree": ((0, None), (1, None)),
        "shutil.move": ((0, None), (1, None)),
    }
    deny = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
            "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sqlite3.connect",
            "sqlite3.enable_load_extension", "sqlite3.load_extension"}
    deny_imports = {"ctypes", "_ctypes", "cffi", "_posixsubprocess", "_sqlite3", "sqlite3"}
    net_events = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo"}

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def resolve(path, dir_fd=None):
        """The real absolute path `path` names (relative to `dir_fd` when given), or None."""
        if isinstance(path, int):  # an open descriptor: where does it point?
            path, dir_fd = readlink(f"/proc/self/fd/{path}"), None
            if not path.startswith("/"):
                return root  # a pipe, socket or /dev/null: not a file-system path
        if type(path) not in safe_path_types:
            # a custom __fspath__ may answer differently to the check and to the system call
            refuse(f"a path of type {type(path).__name__}")
        path = fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not path.startswith("/"):  # the events give -1 for none
            path = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def inside(path, dir_fd=None):
        p = resolve(path, dir_fd)
        return p == root or p.startswith(root + os.sep)

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            # The event does not carry os.open's dir_fd: so no descriptor of a directory outside
            # may exist (relative names are then checked from the cwd, which cannot move).
            if (writing or isdir(resolve(path))) and not inside(path):
                refuse(f"opening {path!r} outside the sandbox directory" + (" for writing" if writing else ""))
        elif event in path_events:
            for i, fd_i in path_events[event]:
                path = args[i] if i < len(args) else None
                dir_fd = args[fd_i] if fd_i is not None and fd_i < len(args) else None
                if path is not None and not inside(path, dir_fd):
                    refuse(f"{event} on {path!r} outside the sandbox directory")
        elif event == "os.chdir":
            if resolve(args[0]) != root:
                refuse("changing the working directory")
        elif event in deny or event.startswith("os.exec") or event.startswith("os.spawn"):
            refuse(event)
        elif event == "import" and args[0] in deny_imports:
            refuse(f"importing {args[0]}")
        elif deny_network and event in net_events:
            refuse(f"network access ({event})")

    return guard

def _no_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: starting processes (_posixsubprocess.fork_exec) is not allowed")

with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
if %(audit)r:
    # `subprocess` (and so asyncio, multiprocessing, ...) import _posixsubprocess: keep them
    # importable, with a fork_exec that refuses; a fresh import of it is refused by the guard.
    import _posixsubprocess
    _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(_make_guard(os.path.realpath(os.getcwd()), %(deny_network)r))
del _f, _make_guard
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


# Run first inside a new user + mount namespace (`unshare -rm ... sh -c _READ_ONLY_VIEW sh WORK
# CMD...`): the working directory is bind-mounted onto itself (it stays writable), every other
# mount but /proc (private to the new pid namespace; the nested `unshare` writes its uid_map) is
# remounted read-only (keeping the flags the parent namespace locked: nosuid, nodev,
# noexec, atime), then CMD runs in a nested user + mount namespace (`unshare -rm`), where those
# mounts are locked: the program cannot remount them writable even as root of its namespace.
# Any mount outside /sys that cannot be made read-only fails the script (exit 97), so
# the probe (`_namespaces`) turns the layer off rather than run with a partial view.
_READ_ONLY_VIEW = r"""
w="$1"; shift
keep() {
  out=""; old="$IFS"; IFS=,
  for o in $1; do
    case "$o" in nosuid|nodev|noexec|relatime|noatime|nodiratime|strictatime) out="$out,$o";; esac
  done
  IFS="$old"; printf '%s' "$out"
}
mounts=$(cat /proc/self/mounts) || exit 97
mount --bind "$w" "$w" || exit 97
cd "$w" || exit 97  # onto the bind mount: the old working directory is on a mount made read-only below
printf '%s\n' "$mounts" | while read -r dev mp fs opts rest; do
  case "$mp" in "$w"|/proc|/proc/*) continue;; esac
  if ! mount -o "remount,bind,ro$(keep "$opts")" "$mp" 2>/dev/null; then
    case "$mp" in /sys|/sys/*) ;; *) exit 97;; esac
  fi
done || exit 97
exec "$@"
"""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here as configured (e.g. as root with no interpreter the
    unprivileged user can run); the message says what to change."""


@dataclasses.dataclass
class SandboxResult:
    """What happened: status "ok" (exit 0), "error" (non-zero exit), "timeout" (killed)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network: str  # "namespace" (unshare -rn) or "audit-hook"
    user: str = ""  # who the program ran as, e.g. "nobody (uid 65534)"
    pid_namespace: bool = False  # a timeout kills every process the program started (setsid too)
    truncated: bool = False  # stdout or stderr was longer than max_output; the rest was read and dropped
    filesystem: str = "audit-hook"  # "read-only view" (a mount namespace) or "audit-hook" (writes refused by it)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class _Identity:
    """Who runs the program: the current user, or (when that is root) an unprivileged one."""

    uid: int | None  # None: do not change user
    gid: int | None
    name: str

    def popen_kwargs(self) -> dict:
        # Popen changes user in C between fork and exec (no Python runs in the child).
        return {} if self.uid is None else {"user": self.uid, "group": self.gid, "extra_groups": []}


def _identity() -> _Identity:
    if os.geteuid() != 0:
        return _Identity(None, None, f"{pwd_name(os.geteuid())} (uid {os.geteuid()})")
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        uid = gid = 65534
    return _Identity(uid, gid, f"nobody (uid {uid})")


def pwd_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


@functools.lru_cache(maxsize=4)
def _interpreter(ident: _Identity) -> str:
    """A Python the sandbox user can run: this one, else a system `python3` (root with a
    Python under /root, which `nobody` cannot read). Probed once per identity."""
    if ident.uid is None:
        return sys.executable
    candidates = [sys.executable, getattr(sys, "_base_executable", "")]
    candidates += [p for p in (shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),) if p]
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            r = subprocess.run([exe, "-I", "-c", "import _posixsubprocess"], capture_output=True, timeout=20,
                               cwd="/", env={"PATH": "/usr/bin:/bin"}, **ident.popen_kwargs())
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return exe
    raise SandboxUnavailable(
        f"running as root, the sandbox drops to {ident.name}, but no Python interpreter is readable by that user "
        f"(tried {', '.join(dict.fromkeys(c for c in candidates if c))}). Install a system python3 "
        "(/usr/bin/python3), or run jaxlearn as an unprivileged user.")


@functools.lru_cache(maxsize=4)
def _namespaces(ident: _Identity) -> tuple[bool, bool, bool]:
    """(network namespace, pid namespace, read-only mount view) usable by `ident` through
    `unshare` (probed once per identity)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False, False, False

    def works(*cmd: str, cwd: str = "/") -> bool:
        try:
            return subprocess.run([exe, *cmd], capture_output=True, timeout=10, cwd=cwd,
                                  **ident.popen_kwargs()).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    net = works("-rn", "true")
    pid = net and works("-rn", "--pid", "--fork", "--kill-child", "true")
    view = False
    sh = shutil.which("sh", path="/usr/bin:/bin")
    if pid and sh and shutil.which("mount", path="/usr/bin:/bin"):
        probe = Path(tempfile.mkdtemp(prefix="jaxlearn-sandbox-probe-"))
        try:
            if ident.uid is not None:
                os.chown(probe, ident.uid, ident.gid)
            # the view holds if the work directory is writable, / is not, and a remount fails
            check = '(: > w) && ! (: > /jaxlearn-probe) 2>/dev/null && ! mount -o remount,rw / 2>/dev/null'
            view = works(*_view_command(exe, sh, probe, [sh, "-c", check]), cwd=str(probe))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    return net, pid, view


def _view_command(unshare: str, sh: str, work: Path, cmd: list[str]) -> list[str]:
    """`cmd` in fresh network, pid and mount namespaces, with a private /proc and the read-only
    view of every mount but `work` (see _READ_ONLY_VIEW)."""
    return ["-rmn", "--pid", "--fork", "--kill-child", "--mount-proc", "--", sh, "-c", _READ_ONLY_VIEW, "sh",
            str(work), unshare, "-rm", "--"] + cmd


def network_namespace_available() -> bool:
    """Whether `unshare -rn` (unprivileged network namespace) works for the sandbox's user.

    >>> isinstance(network_namespace_available(), bool)
    True
    """
    return _namespaces(_identity())[0]


def _processes_of(uid: int) -> int:
    """How many processes (threads included: RLIMIT_NPROC counts tasks) `uid` runs now."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                n += int(fields.get("Threads", "1").strip() or 1)
    return n


def _limits(memory_mb: int, cpu_seconds: int, max_file_mb: int, nproc: int):
    def apply() -> None:  # runs in the child between fork and exec (only without prlimit)
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        size = max_file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 512, max_file_mb: int = 16,
               max_output: int = 1 << 16, max_procs: int = 16, audit: bool = True) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the code does.

    `max_procs`: processes and threads the program may add (RLIMIT_NPROC); `max_output`: bytes
    kept of stdout and of stderr (the rest is read and dropped, never held). `audit=False`
    leaves out the audit-hook layer: only for tests that check the OS layers on their own.

    >>> run_python("while True: pass", timeout=1).status
    'timeout'
    >>> run_python("x = bytearray(1 << 40)").stderr.splitlines()[-1]
    'MemoryError'
    """
    ident = _identity()
    python = _interpreter(ident)
    use_net_ns, use_pid_ns, use_view = _namespaces(ident)
    tmp = Path(tempfile.mkdtemp(prefix="jaxlearn-sandbox-"))
    try:
        (tmp / "program.py").write_text(code, encoding="utf-8")
        (tmp / "_prelude.py").write_text(_PRELUDE % {"deny_network": not use_net_ns, "audit": audit},
                                         encoding="utf-8")
        if ident.uid is not None:  # the unprivileged user works in (only) this directory
            for p in (tmp, tmp / "program.py", tmp / "_prelude.py"):
                os.chown(p, ident.uid, ident.gid)
        cmd = [python, "-I", "-B", str(tmp / "_prelude.py")]
        if use_view:  # as below, and every mount but the work directory read-only (locked)
            unshare = shutil.which("unshare")
            cmd = [unshare] + _view_command(unshare, shutil.which("sh", path="/usr/bin:/bin"), tmp, cmd)
        elif use_pid_ns:  # the program is pid 1 of its own namespace: when it dies, all its processes die
            cmd = [shutil.which("unshare"), "-rn", "--pid", "--fork", "--kill-child", "--"] + cmd
        elif use_net_ns:
            cmd = [shutil.which("unshare"), "-rn", "--"] + cmd  # unshare execs python in place (same pid)
        # RLIMIT_NPROC counts every task of the user, so the cap sits above what it runs already.
        nproc = _processes_of(os.geteuid() if ident.uid is None else ident.uid) + max_procs + 2
        prlimit = shutil.which("prlimit")
        preexec = None
        if prlimit:  # limits set by util-linux prlimit, which then execs: no Python runs between fork and exec
            mb = 1024 * 1024
            cmd = [prlimit, f"--as={memory_mb * mb}", f"--cpu={int(timeout) + 1}", f"--fsize={max_file_mb * mb}",
                   "--core=0", f"--nproc={nproc}", "--"] + cmd
        else:  # fall back to setting them in the forked child
            preexec = _limits(memory_mb, int(timeout) + 1, max_file_mb, nproc)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec,
                                **ident.popen_kwargs())
        try:
            out, err, timed_out, truncated = _collect(proc, timeout, max_output)
        finally:
            _kill_all(proc.pid)  # anything the program left running
            proc.stdout.close()
            proc.stderr.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        status = "timeout" if timed_out else "ok" if proc.returncode == 0 else "error"
        text = lambda b: bytes(b).decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(status, proc.returncode, text(out), text(err), time.perf_counter() - t0,
                             "namespace" if use_net_ns else "audit-hook", ident.name, use_pid_ns, truncated,
                             "read-only view" if use_view else "audit-hook")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(proc: subprocess.Popen, timeout: float, limit: int) -> tuple[bytearray, bytearray, bool, bool]:
    """Read stdout and stderr in 64 KiB chunks until both close and the process exits, keeping
    at most `limit` bytes of each (a program printing 300 MB costs the parent 128 KiB). On
    timeout, kill everything and read on for at most 2 s: an escaped child holding the pipes
    open cannot hang the caller. Returns (stdout, stderr, timed out, truncated)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    drain_until = None  # set when the program has exited: read what is left, briefly
    timed_out = truncated = False
    while True:
        now = time.monotonic()
        if proc.poll() is not None:
            # A child that escaped may still hold the pipes open: do not wait for it.
            drain_until = drain_until or now + 0.5
            if not sel.get_map() or now >= drain_until:
                break
        elif now >= deadline:
            if timed_out:
                break  # the grace period after the kill is over
            timed_out = True
            _kill_all(proc.pid)
            deadline = now + 2.0
            continue
        elif not sel.get_map():  # both pipes closed: wait for the exit itself
            try:
                proc.wait(timeout=deadline - now)
            except subprocess.TimeoutExpired:
                pass
            continue
        wait = min((drain_until or deadline) - now, 0.1)  # wake now and then to see whether it exited
        for key, _ in sel.select(max(wait, 0.0)):
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.fd]
            room = limit - len(buf)
            truncated |= len(chunk) > room
            if room > 0:
                buf += chunk[:room]
    sel.close()
    return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], timed_out, truncated


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (through parent links; a setsid child keeps its parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_all(pid: int) -> None:
    """SIGKILL the program's session: its process group, and every descendant found through
    /proc (children that called setsid). With a pid namespace the kernel does this anyway
    when the namespace's first process dies."""
    try:
        tree = _descendants(pid)
    except OSError:
        tree = []
    # The program's processes first, the group last: `unshare` (our child) then sees its child
    # die and reaps it, instead of leaving it to init as a zombie.
    for target, kill in [(p, os.kill) for p in tree] + [(pid, os.killpg)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
