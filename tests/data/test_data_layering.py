"""How the data layer is put together: no import cycles, and no dependency on the model layer's presets."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import jaxlearn

PACKAGE = Path(jaxlearn.__file__).parent


def module_imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("jaxlearn"):
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.startswith("jaxlearn"))
    return out


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_module_level_imports_form_no_cycle():
    mods = modules()
    graph = {m: module_imports(p, top_level_only=True) & set(mods) for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_data_layer_never_imports_the_model_presets():
    for name, path in modules().items():
        if name.startswith("jaxlearn.data"):
            assert not {i for i in module_imports(path, top_level_only=False)
                        if i.startswith("jaxlearn.models.presets") or i == "jaxlearn.models"}, name


def test_tokenizers_feed_and_presets_import_on_their_own(tmp_path):
    code = ("import os, sys\n"
            "import jaxlearn.data.bpe_tokenizer\n"
            "assert 'jaxlearn.models.presets' not in sys.modules\n"
            "import jaxlearn.data.feed, jaxlearn.distributed\n"
            "from absl import flags\n"
            "assert not flags.FLAGS.is_parsed(), 'flags parsed'\n"
            "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'\n"
            "assert not os.path.exists(os.environ['JAXLEARN_CACHE']), 'cache touched'\n"
            "import jaxlearn.models.presets as p\n"
            "assert p.PRESETS is jaxlearn.data.model_files.PRESETS\n")
    env = {**os.environ, "JAXLEARN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, env=env)
    assert proc.returncode == 0, proc.stderr
