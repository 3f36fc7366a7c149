"""Typed, frozen run configuration: YAML recipes plus dotted command-line overrides.

A recipe is a YAML mapping with up to seven blocks (model, data, objective, peft, optim,
mesh, train). Every key is checked against the dataclasses below: an unknown key is an error
that suggests the nearest valid key, a wrong type is an error that names the key and the type
expected. Example::

    cfg = load_config("configs/pretrain_shakespeare.yaml", ["optim.lr=3e-4", "train.steps=50"])
    cfg.optim.lr  # 0.0003
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and the fix."""


def _check(key: str, value: Any, ok: bool, fix: str) -> None:
    """Range check for `__post_init__`: one ConfigError naming the key, the value and the fix.

    >>> _check("optim.lr", -1.0, -1.0 > 0, "use a positive learning rate such as 3e-4")
    Traceback (most recent call last):
    ...
    jaxlearn.config.ConfigError: optim.lr: -1.0 is out of range; use a positive learning rate such as 3e-4.
    """
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range; {fix}.")


def _positive(block: str, cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        _check(f"{block}.{n}", v, v > 0, "use a positive number")


# --------------------------------------------------------------------------------------------
# Blocks


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE context extension, as in a Hugging Face config.json's `rope_scaling` (the field
    names are transformers'). `none` is plain RoPE. `linear` divides every frequency by
    `factor`; `llama3` (Llama 3.1+) divides only the low frequencies, blending in between;
    `yarn` blends per frequency between interpolated and original (`beta_fast`/`beta_slow`)
    and scales cos/sin by `attention_factor` (None: from factor, mscale, mscale_all_dim).
    Fields a type does not use must keep their defaults. Example (recipe)::

        model: {rope_scaling: {type: llama3, factor: 8, original_max_position_embeddings: 8192}}
    """

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0
    # llama3/yarn: the context length the model was pretrained at; 0: model.max_seq_len
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn, used only with mscale_all_dim (0: unset)
    mscale_all_dim: float = 0.0  # yarn
    attention_factor: float | None = None  # yarn: cos/sin scale; None: derived as transformers does
    truncate: bool = True  # yarn: round the blend range to whole dimensions

    # The fields each type reads; the others must keep their defaults (a typo would go unused).
    _USES: ClassVar[dict[str, tuple[str, ...]]] = {
        "none": (), "linear": ("factor",),
        "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "attention_factor", "truncate")}

    def __post_init__(self):
        key = "model.rope_scaling"
        _check(f"{key}.type", self.type, self.type in self._USES,
               f"use one of {', '.join(self._USES)} (transformers' dynamic, longrope, ... are not supported)")
        for f in dataclasses.fields(self):
            if f.name != "type" and f.name not in self._USES[self.type] and getattr(self, f.name) != f.default:
                raise ConfigError(f"{key}.{f.name} does not apply to rope_scaling.type {self.type!r}; remove it "
                                  f"(it applies to {', '.join(t for t, u in self._USES.items() if f.name in u)}).")
        _check(f"{key}.factor", self.factor, self.factor > 0, "use a positive scale such as 8")
        _check(f"{key}.original_max_position_embeddings", self.original_max_position_embeddings,
               self.original_max_position_embeddings >= 0,
               "use the pretraining context length, or 0 for model.max_seq_len")
        _check(f"{key}.low_freq_factor", self.low_freq_factor, 0 < self.low_freq_factor < self.high_freq_factor,
               f"use a positive number below high_freq_factor={self.high_freq_factor}, e.g. 1")
        _check(f"{key}.beta_slow", self.beta_slow, 0 < self.beta_slow <= self.beta_fast,
               f"use a positive number no larger than beta_fast={self.beta_fast}, e.g. 1")
        _check(f"{key}.mscale", self.mscale, self.mscale >= 0, "use a number >= 0 (0: unset)")
        _check(f"{key}.mscale_all_dim", self.mscale_all_dim, self.mscale_all_dim >= 0, "use a number >= 0 (0: unset)")
        _check(f"{key}.attention_factor", self.attention_factor,
               self.attention_factor is None or self.attention_factor > 0, "use a positive number, or null")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 704
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_style: Literal["rotate_half", "interleaved"] = "rotate_half"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    init_std: float = 0.02
    # auto: the memory-efficient kernel of the compile target: Pallas splash attention on TPU,
    # the Pallas Triton flash kernel on GPU, the blocked XLA path on CPU (models/layers.py attend)
    attention: Literal["auto", "xla", "dot_product_attention", "splash", "flash_gpu", "cudnn"] = "auto"
    # LoRA matmuls in the linear seam (jaxlearn/kernels): auto = fused Pallas kernels on TPU/GPU,
    # XLA on CPU; pallas = Pallas everywhere (CPU: interpret mode, slow); xla = never Pallas.
    kernels: Literal["auto", "pallas", "xla"] = "auto"
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)
    rope_scaling: RopeScalingConfig = RopeScalingConfig()  # RoPE context extension (Llama 3.1, YaRN, ...)
    # Start from pretrained weights: a preset name (smollm2-135m-instruct), a .gguf file or a
    # Hugging Face safetensors directory; empty: random init. See jaxlearn/models/presets.py.
    init_from: str = ""
    # With init_from: a shallower student from the checkpoint's layers (jaxlearn/models/student.py).
    # all: the checkpoint's depth must equal n_layers; first: its layers 0..n_layers-1;
    # every_k: every (checkpoint depth // n_layers)-th layer. Widths must equal the checkpoint's.
    # Without init_from it has no effect (a random init).
    init_layers: Literal["all", "first", "every_k"] = "all"

    def __post_init__(self):
        _positive("model", self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                  "rope_theta", "norm_eps")
        _check("model.head_dim", self.head_dim, self.head_dim is None or self.head_dim > 0,
               "use a positive number, or null for d_model // n_heads")
        _check("model.n_kv_heads", self.n_kv_heads, self.n_heads % self.n_kv_heads == 0,
               f"it must divide model.n_heads={self.n_heads} (grouped-query attention)")
        _check("model.init_std", self.init_std, self.init_std >= 0, "use a standard deviation >= 0, e.g. 0.02")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def layer_matmul_params(self) -> tuple[int, int]:
        """(attention projections q/k/v/o, MLP gate/up/down) weight parameters of one layer.

        >>> ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, d_ff=16, vocab_size=4, n_layers=1).layer_matmul_params()
        (192, 384)
        """
        attn = self.d_model * self.resolved_head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn, 3 * self.d_model * self.d_ff

    def matmul_param_count(self) -> int:
        """Parameters that multiply activations: every layer's projections and the LM head (a
        matmul even when tied); the token embedding is a gather, not counted."""
        return self.n_layers * sum(self.layer_matmul_params()) + self.vocab_size * self.d_model

    def param_count(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        hd = self.resolved_head_dim
        attn, mlp = self.layer_matmul_params()
        layer = attn + mlp + 2 * self.d_model + (hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0)
        layer += 2 * hd if self.qk_norm else 0
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + self.n_layers * layer + self.d_model + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + causal attention (fwd+bwd)."""
        hd = self.resolved_head_dim
        matmul_params = self.matmul_param_count()
        # QK^T and AV: 2 matmuls x 2 FLOPs x seq x heads x head_dim per token, forward; x3 for
        # fwd+bwd. Causal masking halves the useful work (the PaLM/MaxText convention counts it
        # at half).
        attn = 3 * 2 * 2 * seq_len * self.n_heads * hd * self.n_layers / 2
        return 6.0 * matmul_params + attn


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes batches."""

    source: Literal["shakespeare", "brown", "text", "jsonl", "parquet", "arrayrecord", "tfds",
                    "wordnet", "wordnet_antonyms", "wordnet_definitions", "humaneval",
                    "wordnet_antonym_prefs", "wordnet_definition_prefs", "wordnet_antonym_prompts",
                    "safety_sft", "safety_pairs"] = "shakespeare"
    paths: tuple[str, ...] = ()  # files or globs for text/jsonl/parquet/arrayrecord; tfds data_dir
    text_field: str = "text"  # jsonl/parquet/tfds field holding the document text
    tfds_name: str = ""  # registered TFDS builder name (source: tfds)
    eval_fraction: float = 0.05  # share of documents held out when a source has no natural split
    tokenizer: str = ""  # path to a SentencePiece .model; empty: train one into the run dir
    tokenizer_vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8  # global batch, split over hosts and devices
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0  # grain worker processes; 0 keeps everything in this process
    # Document shards the global batch is drawn from (each host feeds the shards it owns);
    # 0: one per host. Set it to a multiple of every host count you will run with, and the data
    # order and data checkpoints stay the same when the number of hosts changes.
    shards: int = 0
    # Instruction data (SFT, see jaxlearn/data/sft.py). `chat`: jsonl/parquet records are
    # conversations (`messages`, or `prompt`/`response`); the wordnet*/humaneval sources are
    # always chat. Loss falls on assistant tokens only unless train_on_prompt.
    # `preference`: (prompt, chosen, rejected) records, one pair per row (jaxlearn/data/preference.py);
    # the wordnet_*_prefs sources are always preference pairs.
    # `unpaired`: (prompt, completion, label) records, desirable or not, for KTO; two per row
    # (jaxlearn/data/preference.py `unpaired_pairs`).
    # `prompts`: prompts with an accept-set for RL, left-padded to seq_len (jaxlearn/data/prompts.py).
    format: Literal["text", "chat", "preference", "unpaired", "prompts"] = "text"
    train_on_prompt: bool = False
    # Examples longer than seq_len + 1 tokens: `left` cuts prompt tokens from the left when the
    # whole response still fits (else the example is dropped); `drop` drops them. Both counted.
    truncation: Literal["left", "drop"] = "left"
    max_examples: int = 0  # chat: use at most this many training examples (0: all), a fixed sample

    def __post_init__(self):
        _positive("data", self, "seq_len", "batch_size", "tokenizer_vocab_size")
        _check("data.eval_fraction", self.eval_fraction, 0.0 <= self.eval_fraction < 1.0, "use a share in [0, 1), e.g. 0.05")
        for n in ("num_workers", "shards", "max_examples"):
            _check(f"data.{n}", getattr(self, n), getattr(self, n) >= 0, "use 0 or a positive number")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Base of every objective's config block. `type` picks the objective (and so which keys
    the block takes): a built-in name (`lm`) or `package.module:Class` for your own. Each
    objective's own block subclasses this (`jaxlearn/objectives/`); see
    jaxlearn/objectives/registry.py."""

    type: str = "lm"


def _default_objective() -> ObjectiveConfig:
    from jaxlearn.objectives.lm import LMConfig  # lazy: objectives import this module

    return LMConfig()


def objective_config_class(type_name: Any, where: str = "objective.type") -> type:
    """The config dataclass of the objective named `type_name`."""
    if not isinstance(type_name, str):
        raise ConfigError(f"{where}: expected an objective name (a string such as 'lm'), got {type_name!r}.")
    from jaxlearn.objectives.registry import objective_class

    return objective_class(type_name, where).Config


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Which parameters train, and which adapters are attached (see jaxlearn/peft/).

    `none`: full fine-tuning, or partial fine-tuning when `trainable` lists path regexes.
    `lora`/`dora`/`ia3`/`adapter`: adapter leaves are attached next to the weights of the modules
    matched by `targets`; only they train, plus whatever `trainable` adds (e.g. `lm_head`).
    `prefix`/`prompt`: learned per-layer key/value prefixes, or a soft prompt, seen by every token.
    """

    type: Literal["none", "lora", "dora", "ia3", "adapter", "prefix", "prompt"] = "none"
    # regexes over parameter paths such as `layers/attn/q/kernel` (re.search). For `none`, empty
    # means everything trains; for adapter methods, extra parameters that train with the adapter.
    trainable: tuple[str, ...] = ()
    # regexes over module paths (`layers/attn/q`) where adapters attach; empty: the method's default
    # (lora/dora: all attention and MLP projections; ia3: k, v, mlp/down; adapter: attn/o, mlp/down)
    targets: tuple[str, ...] = ()
    rank: int = 8  # lora/dora
    alpha: float = 16.0  # lora/dora: scale alpha/rank
    rslora: bool = False  # lora/dora: scale alpha/sqrt(rank) (rank-stabilised LoRA)
    # lora/dora: dropout rate on the adapter's input (x in (x A) B) during training only;
    # the base path and evaluation/generation are never dropped.
    dropout: float = 0.0
    bottleneck: int = 64  # adapter: width of the down-projection
    num_virtual_tokens: int = 16  # prefix/prompt: length of the learned prefix or soft prompt
    prefix_hidden: int = 256  # prefix: width of the reparametrisation MLP used during training
    init_text: str = ""  # prompt: initialise the soft prompt from this text's token embeddings
    seed: int = 0  # adapter initialisation
    # lora/dora: store the frozen base of the adapted layers quantized (QLoRA): int8 per-channel
    # or nf4 with block scales, dequantised tile by tile in the kernels (jaxlearn/peft/quantize.py)
    quantize: Literal["none", "int8", "nf4"] = "none"

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout: {self.dropout!r} is out of range; use a rate in [0, 1), e.g. 0.05.")
        if self.quantize != "none" and self.type not in ("lora", "dora"):
            raise ConfigError(f"peft.quantize applies to lora/dora only (peft.type is {self.type!r}); set it to none.")
        if self.dropout and self.type not in ("lora", "dora"):
            raise ConfigError(f"peft.dropout applies to lora/dora only (peft.type is {self.type!r}); set it to 0.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + decay, clipping and in-step gradient accumulation."""

    lr: float = 1e-3
    warmup_steps: int = 50
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # microbatches per step, accumulated inside the compiled step

    def __post_init__(self):
        # a negative learning rate trains by gradient ascent; zero trains nothing
        _check("optim.lr", self.lr, self.lr > 0, "use a positive learning rate, e.g. 3e-4")
        _check("optim.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "use 0 (no warmup) or more steps")
        _check("optim.min_lr_ratio", self.min_lr_ratio, 0.0 <= self.min_lr_ratio <= 1.0, "use a ratio in [0, 1]")
        for n in ("b1", "b2"):
            _check(f"optim.{n}", getattr(self, n), 0.0 <= getattr(self, n) < 1.0, "use a decay rate in [0, 1), e.g. 0.9")
        _check("optim.eps", self.eps, self.eps > 0, "use a small positive number, e.g. 1e-8")
        _check("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, "use 0 (none) or a positive rate")
        _check("optim.clip_norm", self.clip_norm, self.clip_norm >= 0, "use 0 (no clipping) or a positive norm")
        _check("optim.grad_accum", self.grad_accum, self.grad_accum >= 1, "use 1 (no accumulation) or more")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: a preset over the named axes (data, fsdp, tensor). -1 fills the rest."""

    preset: Literal["dp", "fsdp", "fsdp_tp"] = "fsdp"
    data: int = -1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = ()  # extra (logical axis, mesh axes) pairs, override the preset
    # Multi-slice TPU (slices joined by the data-center network): the `data` axis spans the
    # slices, `data`/`fsdp`/`tensor` above describe one slice. 1: a single slice.
    slices: int = 1

    def __post_init__(self):
        for n in ("data", "fsdp"):
            v = getattr(self, n)
            _check(f"mesh.{n}", v, v == -1 or v >= 1, "use -1 (fill the remaining devices) or a positive size")
        _positive("mesh", self, "tensor", "slices")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: length, logging, evaluation, checkpoints, samples."""

    steps: int = 200
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation (a final one still runs)
    eval_at_start: bool = False  # also evaluate before the first step (logged as step 0): the "before" numbers
    eval_batches: int = 8
    save_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    best_metric: str = ""  # e.g. "eval_loss": keep the best by this metric too
    async_checkpoint: bool = True
    resume: bool = False
    sample_prompts: tuple[str, ...] = ("ROMEO:",)
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    progress: bool = True
    # A step whose loss or gradient norm is NaN/inf never updates the weights (jaxlearn/train/guard.py).
    # skip: count it (metric `nonfinite`) and go on; stop: end the run with an error (exit 2).
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # Forgetting report (jaxlearn/eval/forgetting.py): general probes on the base (cached per base
    # fingerprint) and on the trained model, into summary.json, forgetting.md and forgetting.png.
    # auto: on when model.init_from is set (a fine-tuning run), off otherwise; true/false force it.
    forgetting: bool | Literal["auto"] = "auto"
    forgetting_probes: tuple[str, ...] = ("probes:facts", "probes:format")  # eval task names
    forgetting_limit: int = 48  # items per probe (spread over its relations / checks)
    forgetting_threshold: float = 2.0  # points (percent for perplexity) a probe may fall before a warning
    forgetting_cache: str = ""  # where base results are cached; "" = <JAXLEARN_CACHE>/forgetting

    def __post_init__(self):
        _positive("train", self, "steps", "log_every", "keep_checkpoints", "eval_batches")
        _check("train.forgetting_limit", self.forgetting_limit, self.forgetting_limit >= 0,
               "use a number of items per probe, or 0 for all")
        _check("train.forgetting_threshold", self.forgetting_threshold, self.forgetting_threshold >= 0,
               "use a non-negative number of points, e.g. 2")
        for n in ("eval_every", "save_every"):
            _check(f"train.{n}", getattr(self, n), getattr(self, n) >= 0, "use 0 or a positive number")
        _check("train.sample_tokens", self.sample_tokens, self.sample_tokens > 0 or not self.sample_prompts,
               "use a positive number of tokens, or train.sample_prompts=[] for no samples")
        _check("train.sample_temperature", self.sample_temperature, self.sample_temperature >= 0,
               "use 0 (greedy) or a positive temperature, e.g. 0.8")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = dataclasses.field(default_factory=_default_objective)
    peft: PeftConfig = PeftConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()


# --------------------------------------------------------------------------------------------
# Parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, args))}.{hint}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {' | '.join(_type_name(a) for a in args)}.")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis and isinstance(value, str):
                value = [value]  # a single string where a list is expected: the common typo
            else:
                raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {tp!r}.")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys for {cls.__name__}, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
            raise ConfigError(
                f"unknown key '{_join(where, key)}'.{hint} Valid keys here: {', '.join(fields)}."
            )
        tp = hints[key]
        if tp is ObjectiveConfig:  # a typed block per objective: its `type` picks the dataclass
            value = value or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{_join(where, key)}: expected a mapping (type: lm, ...), got {type(value).__name__}.")
            tp = objective_config_class(value.get("type", "lm"), _join(where, f"{key}.type"))
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, _join(where, key))
        else:
            kwargs[key] = _coerce(value, tp, _join(where, key))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a block.")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `["optim.lr=3e-4", "train.steps=10"]` into a nested dict (values parsed as YAML).

    >>> parse_overrides(["optim.lr=3e-4"])
    {'optim': {'lr': '3e-4'}}
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (for example optim.lr=3e-4).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_mappings(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, nested mappings merged key by key (neither is changed).

    >>> merge_mappings({"train": {"steps": 3, "log_every": 1}}, {"train": {"steps": 5}})
    {'train': {'steps': 5, 'log_every': 1}}
    """
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict, where: str = "") -> Config:
    """Build a checked `Config` from a plain nested dict (as read from YAML)."""
    return _build(Config, data, where)


def read_yaml_mapping(path: str | os.PathLike, what: str, example: str) -> dict:
    """The YAML mapping in `path`; a missing file, bad YAML (with line and column), non-UTF-8 text
    or a non-mapping is a ConfigError naming `what` (e.g. "recipe") and the file.

    >>> read_yaml_mapping("missing.yaml", "recipe", "configs/x.yaml")   # doctest: +SKIP
    ConfigError: recipe missing.yaml does not exist. Pass the path of a YAML file, e.g. configs/x.yaml.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist. Pass the path of a YAML file, e.g. {example}.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {p} is not valid YAML ({loc.strip() or 'unknown place'}): "
                          f"{getattr(e, 'problem', e)}. Fix the indentation or quoting there.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte {e.start}). Save it as UTF-8.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must be a YAML mapping of blocks (model:, data:, ...), got {type(data).__name__}.")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a YAML recipe, apply dotted overrides, and type-check everything.

    >>> cfg = load_config(None, ["train.steps=3"])
    >>> cfg.train.steps
    3
    """
    data = read_yaml_mapping(path, "recipe", "configs/pretrain_shakespeare.yaml") if path is not None else {}
    data = merge_mappings(data, parse_overrides(list(overrides)))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        src = f"recipe {path}" if path else "overrides"
        raise ConfigError(f"{src}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def conv(x):
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
