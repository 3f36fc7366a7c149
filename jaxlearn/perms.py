"""Normal permissions for files and directories made through `tempfile`.

`tempfile.mkstemp` creates files 0600 and `mkdtemp` directories 0700, on purpose: they are
private scratch space. A file written that way and then renamed into place (a tokenizer, an
adapter version) keeps that private mode, and other users of a shared run directory cannot read
it. `make_normal` gives such a path the mode a plain `open`/`mkdir` would have (0644/0755 under
the usual umask 022). Example::

    fd, tmp = tempfile.mkstemp(dir=out.parent)
    make_normal(tmp)      # 0644, as if written by open(path, "w")
    os.replace(tmp, out)
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads).

    >>> current_umask() & 0o777 == current_umask()
    True
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022  # the common default where /proc is not there


def make_normal(path: str | os.PathLike) -> None:
    """chmod `path` to 0666 (files) or 0777 (directories), less the umask.

    >>> import tempfile; d = tempfile.mkdtemp(); make_normal(d); oct(os.stat(d).st_mode & 0o777)  # doctest: +SKIP
    '0o755'
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())
