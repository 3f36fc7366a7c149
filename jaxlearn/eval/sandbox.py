"""Run untrusted Python (model-generated code) in a constrained subprocess.

Layers, from strongest to weakest (no root needed for any of them):

1. **Process**: a fresh `python -I -B` (isolated: no user site, no PYTHON* variables, no
   script directory on sys.path) in its own session/process group; on timeout the whole
   group is killed with SIGKILL (`os.killpg`), so children cannot outlive it.
2. **Resource limits** (`prlimit`, else `setrlimit` in the child before exec): address space (`memory_mb`), CPU seconds,
   file size (`max_file_mb`), no core dumps. A memory bomb gets `MemoryError`; a busy loop is
   killed by the wall-clock timeout (and by RLIMIT_CPU if the parent is stuck).
3. **Network**: when `unshare -rn` works (an unprivileged user + network namespace; most
   Linux hosts and containers allow it), the program runs in a namespace whose only interface
   is a down loopback: no connection can leave. Where it does not work, the prelude's audit
   hook refuses `socket.connect`/`bind`/`sendto`/`getaddrinfo`; `SandboxResult.network`
   says which layer was used.
4. **File system**: the working directory is a fresh temporary directory (removed
   afterwards), HOME/TMPDIR point into it, and the environment is scrubbed. A prelude
   installs a `sys.addaudithook` hook (it cannot be removed once added) that refuses opening a
   file for writing, and removing, renaming, creating or changing files, anywhere outside that
   directory; it also refuses starting processes (`os.system`, `subprocess`, `fork`, `exec`)
   and loading `ctypes`, which could go around the hook.

Honest limits: the audit hook is a guard against ordinary code (what a language model
writes), not a security boundary against a determined attacker who finds a C-level escape; it
does not confine reads. For hostile code, run this inside a container or VM as well.
Example::

    r = run_python("print(sum(range(10)))", timeout=5)
    r.status, r.stdout          # ('ok', '45\\n')
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Installed before the untrusted program runs; `_ROOT` is the sandbox's temporary directory.
_PRELUDE = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_NET = %(deny_network)r
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
                "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2, "os.chdir": 1}
_DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
         "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.setrecursionlimit_never"}
_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo"}

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    elif event in _PATH_EVENTS:
        for path in args[:_PATH_EVENTS[event]]:
            if path is not None and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox directory is not allowed")
    elif event in _DENY or event.startswith("os.exec") or event.startswith("os.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event == "import" and args[0] in ("ctypes", "_ctypes", "cffi"):
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    elif _NET and event in _NET_EVENTS:
        raise PermissionError(f"sandbox: network access ({event}) is not allowed")

with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
sys.addaudithook(_guard)
del _f
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclasses.dataclass
class SandboxResult:
    """What happened: status "ok" (exit 0), "error" (non-zero exit), "timeout" (killed)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network: str  # "namespace" (unshare -rn) or "audit-hook"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` (unprivileged network namespace) works on this host (probed once).

    >>> isinstance(network_namespace_available(), bool)
    True
    """
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(memory_mb: int, cpu_seconds: int, max_file_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        size = max_file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 512, max_file_mb: int = 16,
               max_output: int = 1 << 16) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the code does.

    >>> run_python("while True: pass", timeout=1).status
    'timeout'
    >>> run_python("x = bytearray(1 << 40)").stderr.splitlines()[-1]
    'MemoryError'
    """
    tmp = Path(tempfile.mkdtemp(prefix="jaxlearn-sandbox-"))
    use_ns = network_namespace_available()
    try:
        (tmp / "program.py").write_text(code, encoding="utf-8")
        (tmp / "_prelude.py").write_text(_PRELUDE % {"deny_network": not use_ns}, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", str(tmp / "_prelude.py")]
        if use_ns:
            cmd = [shutil.which("unshare"), "-rn"] + cmd  # unshare execs python in place (same pid)
        prlimit = shutil.which("prlimit")
        preexec = None
        if prlimit:  # limits set by util-linux prlimit, which then execs: no Python runs between fork and exec
            mb = 1024 * 1024
            cmd = [prlimit, f"--as={memory_mb * mb}", f"--cpu={int(timeout) + 1}", f"--fsize={max_file_mb * mb}",
                   "--core=0", "--"] + cmd
        else:  # fall back to setting them in the forked child
            preexec = _limits(memory_mb, int(timeout) + 1, max_file_mb)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            status = "timeout"
        finally:
            _kill_group(proc.pid)  # anything the program left running in its group
        seconds = time.perf_counter() - t0
        text = lambda b: b[:max_output].decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(status, proc.returncode, text(out), text(err), seconds,
                             "namespace" if use_ns else "audit-hook")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
