"""The code-execution sandbox: generated code is untrusted."""

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from jaxlearn.eval.sandbox import run_python


def test_runs_ordinary_code_and_reports_failures():
    ok = run_python("print(sum(range(10)))")
    assert (ok.status, ok.stdout) == ("ok", "45\n")
    bad = run_python("assert 1 == 2, 'nope'")
    assert bad.status == "error" and "AssertionError: nope" in bad.stderr


def test_kills_an_infinite_loop():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.ok
    assert time.perf_counter() - t0 < 6  # killed, not waited for
    assert r.returncode == -9  # SIGKILL to the process group


def test_stops_a_memory_bomb():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n", memory_mb=256, timeout=20)
    assert r.status == "error" and "MemoryError" in r.stderr


@pytest.mark.parametrize("how", [
    "open({path!r}, 'w').write('x')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib; pathlib.Path({path!r}).write_text('x')",
    "import os; os.symlink('/etc/passwd', {path!r})",
    "import os; os.system('touch {path}')",
    "import subprocess; subprocess.run(['touch', {path!r}])",
    "import os; open('inside.txt', 'w').write('x'); os.rename('inside.txt', {path!r})",
])
def test_cannot_write_outside_its_directory(tmp_path, how):
    target = tmp_path / f"escape-{uuid.uuid4().hex}"
    r = run_python(how.format(path=str(target)))
    assert not target.exists()
    assert r.status == "error" and "PermissionError" in r.stderr


def test_can_write_inside_its_directory_which_is_removed_afterwards():
    r = run_python("import os\nopen('out.txt', 'w').write('hello')\nprint(open('out.txt').read(), os.getcwd())")
    assert r.ok, r.stderr
    text, cwd = r.stdout.split()
    assert text == "hello" and "jaxlearn-sandbox-" in cwd
    assert not os.path.exists(cwd)


def test_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # a listening port: a TCP connect would succeed even without accept()
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    try:
        # The control: the same program outside the sandbox connects.
        plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert plain.stdout.strip() == "connected"
        r = run_python(code)
    finally:
        server.close()
    assert r.status == "error" and "connected" not in r.stdout
    assert "Network is unreachable" in r.stderr or "PermissionError" in r.stderr
    assert r.network in ("namespace", "audit-hook")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("JAXLEARN_SECRET_TOKEN", "s3cret")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.ok and "JAXLEARN_SECRET_TOKEN" not in r.stdout
