"""Ahead-of-time fit check: compile the exact training step for a real TPU topology, on a CPU.

`fit_check(cfg, "v5p:4x4x4")` builds the recipe's mesh over the devices of that topology (as
libtpu describes them; no TPU is needed), builds the training state *abstractly* with the
trainer's own `build_state(..., abstract=True)` (nothing is allocated, so 70B models are fine),
lowers and compiles the trainer's own step (`compile_train_step`) and reads XLA's per-device
memory and FLOP counts. Example::

    report = fit_check(load_config("configs/pod/llama3_8b_full_ft.yaml"), "v5p:4x4x4")
    report.fits, report.total_bytes / 2**30      # True, ~40 GiB per chip
    print(report.text())

The step is the one a TPU would run: backend-dependent choices in the forward (`model.kernels`:
fused Pallas LoRA kernels; `model.attention`) resolve for the mesh's platform, TPU, not for this
CPU host (`ShardingContext.platform`), so the program holds the Mosaic kernels and the TPU's
attention, and the report names them (`seams`).

FLOPs (`flop_count`): XLA's cost analysis of the step, extrapolated from two small compiles
to all layers, beside the analytic count of what the program should execute
(`expected_flops_per_token`: remat recompute, attention as compiled) and the MFU convention
6N + causal attention (`ModelConfig.flops_per_token`); `FitReport.flops_notes` says why they
differ (docs/pods.md, "Why XLA's FLOPs differ from 6N").

Frozen extra models (a DPO reference policy, a distillation teacher) and objective-owned heads
come from the recipe's objective (`Objective.extras()`, `init_heads`): the extras are built
abstractly in their shardings by the trainer's own `build_extras` and passed to the trainer's
own compiled step, so the report counts them per chip (`extra_model_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import Config, ModelConfig
from jaxlearn.kernels.dispatch import describe as describe_kernels
from jaxlearn.models.layers import CAUSAL_BLOCK, resolve_attention
from jaxlearn.models.transformer import Transformer
from jaxlearn.objectives.registry import build_objective
from jaxlearn.peft.filter import flat_paths
from jaxlearn.pod.topologies import GIB, TpuGeneration, parse_topology, slice_name, topology_devices
from jaxlearn.sharding import ShardingContext, make_mesh, rules_for
from jaxlearn.train.extras import build_extras
from jaxlearn.train.state import build_state
from jaxlearn.train.step import compile_train_step

# Above this share of HBM a run is reported as not fitting: the runtime reserves some HBM and
# fragmentation needs headroom.
HBM_HEADROOM = 0.9

# XLA options of the FLOP compiles only (the memory compile is the program the TPU runs). On
# large enough operands the TPU SPMD partitioner turns an FSDP weight all-gather + its matmul
# (and a weight-gradient matmul + its reduce-scatter) into a "windowed einsum" (collective
# matmul): a while loop over the weight's shards that overlaps the ring transfers with partial
# matmuls. XLA's cost analysis counts a loop body once, so each such matmul counted one
# iteration of its FLOPs (Llama-3-8B, 8192 tokens per chip on 32 chips: 16 iterations, XLA's
# step FLOPs 0.52x of 6N + attention instead of ~1.07x). Without the windowing the same matmuls
# have the same FLOPs, in one piece.
FLOP_COMPILE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}

# Attention implementations (models/layers.py `attend`) that run as custom calls: XLA's cost
# analysis counts a custom call without a cost estimate as 0 FLOPs (JAX's splash kernels carry
# none), so their FLOPs are added analytically (`FitReport.kernel_flops`).
KERNEL_ATTENTION = ("splash", "flash_gpu", "cudnn")


@dataclasses.dataclass
class FitReport:
    """Per-device numbers of one compiled training step on one topology."""

    topology: str
    accelerator: str  # Cloud TPU name, e.g. v5p-128
    generation: TpuGeneration
    n_devices: int
    n_chips: int
    mesh: dict
    params: int  # model parameters (analytic)
    trainable: int  # trainable parameters (from the abstract state)
    tokens_per_step: int
    # per-device bytes of the step's arguments, from the shardings
    trainable_bytes: int
    frozen_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    extra_model_bytes: int
    # per-device bytes from XLA's memory analysis
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int  # per device
    xla_flops: float  # per device per step, XLA's cost analysis (all layers, loops counted whole)
    model_flops: float  # per step, whole slice: (6 N + causal attention) x tokens, the MFU convention
    compile_seconds: float
    biggest: list[tuple[str, int]]  # largest per-device argument leaves
    suggestions: list[str]
    compile_error: str = ""  # the TPU compiler's out-of-memory message, when it refused the step
    # what each backend-dependent seam of the forward compiled to on the target, e.g.
    # {"kernels": "pallas-tpu (Mosaic)", "attention": "dot_product_attention"}
    seams: dict = dataclasses.field(default_factory=dict)
    # per step, whole slice: what this program should execute (`expected_flops_per_token`: 6N,
    # remat recompute, attention as compiled), including `kernel_flops`; NaN when not modelled
    expected_flops: float = float("nan")
    # per step, whole slice: analytic FLOPs of custom calls XLA counts as 0 (splash attention)
    kernel_flops: float = 0.0
    flops_notes: list[str] = dataclasses.field(default_factory=list)  # why XLA, expected and model differ
    # facts read off the compiled program (`program_facts`): attention implementation, loops
    program: dict = dataclasses.field(default_factory=dict)
    # matmul parameters that train: base weights (incl. the LM head) and adapter matrices; with
    # whether the token embedding trains (then the first layer's input gradient is needed)
    trained_matmuls: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Peak per-device HBM of the step: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return not self.compile_error and self.total_bytes <= HBM_HEADROOM * self.hbm_bytes

    @property
    def step_flops(self) -> float:
        """FLOPs of the step over the whole slice: XLA's count + the kernels XLA counts as 0."""
        return self.xla_flops * self.n_devices + self.kernel_flops

    @property
    def flops_ratio(self) -> float:
        """`step_flops` / the analytic (6 N + causal attention) model FLOPs: ~1.0 without remat
        (a little more: masked full-length attention, elementwise work), more with remat."""
        return self.step_flops / self.model_flops

    @property
    def expected_ratio(self) -> float:
        """`step_flops` / `expected_flops`, the count of what this program should execute:
        ~1.0 when XLA's count is complete and the model of the program is right."""
        return self.step_flops / self.expected_flops

    @property
    def step_seconds_at_peak(self) -> float:
        """Step time if every chip ran the model FLOPs at its bf16 peak (100 % MFU)."""
        return self.model_flops / (self.n_chips * self.generation.peak_bf16_tflops * 1e12)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["generation"] = self.generation.name
        d.update(total_bytes=self.total_bytes, fits=self.fits, step_flops=self.step_flops,
                 flops_ratio=self.flops_ratio, expected_ratio=self.expected_ratio,
                 step_seconds_at_peak=self.step_seconds_at_peak)
        return d

    def _flops_lines(self) -> list[str]:
        xla = self.xla_flops * self.n_devices
        kernels = f" + kernels {self.kernel_flops:.3e} (analytic)" if self.kernel_flops else ""
        lines = [(f"FLOPs per step (all devices): XLA {xla:.3e}{kernels} vs model 6N+attn {self.model_flops:.3e}: "
                  f"ratio {self.flops_ratio:.2f}")]
        if self.expected_flops == self.expected_flops:  # not NaN
            lines.append(f"  expected for this program {self.expected_flops:.3e}: XLA{'+kernels' if kernels else ''} / "
                         f"expected {self.expected_ratio:.3f}")
        return lines + [f"  {n}" for n in self.flops_notes]

    def text(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        lines = [
            f"topology {self.topology} ({self.accelerator}): {self.n_chips} chips, {self.n_devices} devices, "
            f"mesh {self.mesh}",
            f"model {self.params / 1e9:.2f} B params, {self.trainable / 1e9:.3f} B trainable; "
            f"{self.tokens_per_step:,} tokens/step; compiled in {self.compile_seconds:.1f} s",
            *([f"seams ({self.generation.name}): " + ", ".join(f"{k} {v}" for k, v in self.seams.items())]
              if self.seams else []),
            "per-device memory:",
            f"  params (trainable)     {g(self.trainable_bytes)}",
            f"  params (frozen)        {g(self.frozen_bytes)}",
            f"  optimizer state        {g(self.opt_state_bytes)}",
            f"  batch                  {g(self.batch_bytes)}",
        ]
        if self.extra_model_bytes:
            lines.append(f"  frozen extra models    {g(self.extra_model_bytes)}")
        lines += [
            f"  arguments (XLA)        {g(self.argument_bytes)}",
            f"  temporaries (XLA)      {g(self.temp_bytes)}",
            f"  outputs not donated    {g(self.output_bytes - self.alias_bytes)}",
            f"  total                  {g(self.total_bytes)}  of {self.hbm_bytes / GIB:.1f} GiB HBM "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f} %)",
            *self._flops_lines(),
            f"step time at 100 % MFU ({self.generation.peak_bf16_tflops:.0f} TFLOP/s bf16 per chip): "
            f"{self.step_seconds_at_peak:.3f} s; at 40 % MFU: {self.step_seconds_at_peak / 0.4:.3f} s",
            *([f"the TPU compiler refused the step: {self.compile_error}"] if self.compile_error else []),
            f"verdict: {'FITS' if self.fits else 'DOES NOT FIT'} "
            f"(limit {100 * HBM_HEADROOM:.0f} % of HBM = {HBM_HEADROOM * self.hbm_bytes / GIB:.1f} GiB)",
            "biggest per-device arguments: " + ", ".join(f"{p} {b / GIB:.2f} GiB" for p, b in self.biggest),
        ]
        lines += [f"suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def fit_check(cfg: Config, topology: str, *, slices: int | None = None, count_flops: bool = True) -> FitReport:
    """Compile `cfg`'s training step for `topology` ahead of time and report per-device memory.

    With `count_flops`, two more compiles give the step's FLOPs (`flop_count`):
    XLA's count, the analytic count of what the program should execute, and why they differ
    (`FitReport.flops_notes`); without it `xla_flops` is NaN.

    >>> cfg = load_config("configs/pod/llama3_8b_full_ft.yaml", ["data.batch_size=32", "data.seq_len=8192"])
    >>> r = fit_check(cfg, "v5p:4x4x2")                                   # doctest: +SKIP
    >>> r.fits, round(r.flops_ratio, 2), round(r.expected_ratio, 2)      # doctest: +SKIP
    (True, 1.24, 1.0)
    """
    report = _compile_report(cfg, topology, slices)
    if count_flops:
        flops = flop_count(cfg, topology, slices=slices)
        report.xla_flops = flops.xla / report.n_devices
        report.kernel_flops, report.expected_flops = flops.kernel, flops.expected
        report.flops_notes = flops.notes
        if report.program.get("windowed_einsum_loops"):
            report.flops_notes.append(
                f"the step overlaps {report.program['windowed_einsum_loops']} weight all-gathers/reduce-scatters with "
                f"their matmuls (windowed einsum loops), whose bodies XLA's cost analysis counts once: the FLOP "
                f"compiles turn the windowing off")
    else:
        report.xla_flops = float("nan")
    return report


@dataclasses.dataclass
class FlopCount:
    """FLOPs of one training step over the whole slice (`flop_count`)."""

    xla: float  # XLA's cost analysis, all devices, all layers, loops counted whole
    kernel: float  # analytic FLOPs of custom calls XLA counts as 0 (attention kernels)
    expected: float  # analytic count of what the program should execute, `kernel` included; NaN: not modelled
    model: float  # 6N + causal attention (the MFU convention)
    parts: dict  # the expected count per token, by part (`expected_flops_per_token`)
    notes: list[str]  # why they differ
    program: dict  # `program_facts` of the 2-layer FLOP compile

    @property
    def expected_ratio(self) -> float:
        """(XLA + kernels) / expected."""
        return (self.xla + self.kernel) / self.expected


def flop_count(cfg: Config, topology: str, *, slices: int | None = None) -> FlopCount:
    """FLOPs of `cfg`'s training step on `topology`, from two small compiles of the same step.

    XLA's cost analysis counts the body of a loop once, so the count comes from compiles whose
    loops are gone: the layers unrolled, 1 and 2 of them, extrapolated to all (exact for
    identical layers; a teacher in the objective's config is unrolled whole); the LM head's
    `loss_chunk` loop made one chunk; `grad_accum` microbatches counted as one microbatch x
    their number (the optimizer update, a few FLOPs per parameter, then counts that many times);
    and the TPU's windowed einsum loops switched off (`FLOP_COMPILE_OPTIONS`). Loops that
    remain are named in `notes`. Beside it the analytic count of what the program should
    execute (`expected_flops_per_token`, for the lm objective) and 6N + causal attention.

    >>> f = flop_count(cfg, "v5p:2x2x2")                      # doctest: +SKIP
    >>> round(f.expected_ratio, 2), f.program["loops"]        # doctest: +SKIP
    (1.01, 0)
    """
    m, b, t, k = cfg.model, cfg.data.batch_size, cfg.data.seq_len, cfg.optim.grad_accum
    notes: list[str] = []
    rows = b
    if k > 1:
        mesh = make_mesh(dataclasses.replace(cfg.mesh, slices=cfg.mesh.slices if slices is None else slices),
                         topology_devices(topology, cfg.mesh.slices if slices is None else slices))
        if (b // k) % int(np.prod([mesh.shape[a] for a in ("data", "fsdp")])) == 0:
            rows = b // k
            notes.append(f"optim.grad_accum={k}: XLA's count is one microbatch's step x {k} (the accumulation loop "
                         f"would count once)")
    objective = _unrolled_models(cfg.objective)
    if getattr(objective, "loss_chunk", 0):
        # one chunk: the same FLOPs as `loss_chunk` chunks, without the loop XLA counts once
        objective = dataclasses.replace(objective, loss_chunk=rows * t)

    def small(n: int) -> Config:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, n_layers=n, scan_layers=False),
                                   data=dataclasses.replace(cfg.data, batch_size=rows),
                                   optim=dataclasses.replace(cfg.optim, grad_accum=1), objective=objective)

    nan = float("nan")
    try:
        r1 = _compile_report(small(1), topology, slices, memory=False)
        r2 = _compile_report(small(2), topology, slices, memory=False)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        msg = str(e).split("\n")[0]
        return FlopCount(nan, 0.0, nan, nan, {}, [f"the FLOP compiles were refused: {msg}"], {})
    per_device = r1.xla_flops + (m.n_layers - 1) * (r2.xla_flops - r1.xla_flops)
    xla = per_device * r2.n_devices * (b // rows)
    # The trained matmul parameters, extrapolated like the FLOPs (layer 2 adds one layer's).
    trained = {key: r1.trained_matmuls[key] + (m.n_layers - 1) * (r2.trained_matmuls[key] - r1.trained_matmuls[key])
               for key in ("base", "adapters")}
    trained["embedding"] = r2.trained_matmuls["embedding"]
    program = r2.program
    # the implementation the program holds (named scopes), which may differ from the
    # configured one (kernels fall back to dot_product_attention where they cannot tile T)
    attention = program["attention"][0] if len(program["attention"]) == 1 else r2.seams["attention"]
    model = m.flops_per_token(t) * b * t
    if program.get("loops"):
        notes.append(f"{program['loops']} loop(s) remain in the FLOP compiles ({', '.join(program['loop_ops'])}): XLA "
                     f"counted each body once, so XLA's count is short of their other iterations")
    if cfg.objective.type != "lm" or getattr(cfg.objective, "kl_to_base", 0):
        notes.append(f"the expected count is modelled for the plain lm objective, not {cfg.objective.type!r} "
                     f"(extra models, other batches)")
        if attention not in ("dot_product_attention", "xla"):
            notes.append(f"attention runs in Pallas kernels ({attention}), which XLA counts as 0 FLOPs: not added here")
        return FlopCount(xla, 0.0, nan, model, {}, notes, program)
    parts = expected_flops_per_token(cfg, attention, trained)
    notes += flops_notes(cfg, attention, parts)
    tokens = b * t
    return FlopCount(xla, parts["kernel"] * tokens, parts["total"] * tokens, model, parts, notes, program)


def _matmul_params(m: ModelConfig) -> tuple[int, int, int]:
    """(attention projections, MLP, MLP down) parameters of one layer."""
    return (*m.layer_matmul_params(), m.d_model * m.d_ff)


def expected_flops_per_token(cfg: Config, attention: str, trained: dict | None = None) -> dict[str, float]:
    """FLOPs one token of `cfg`'s training step should cost, by part, when its attention
    compiled to `attention` (an implementation name of models/layers.py `attend`).

    - `weights`: every matmul weight (layers and LM head; the embedding is a gather, no
      FLOPs) costs 2 forward + 2 for the input gradient + 2 for its own gradient if it trains
      (6N for full fine-tuning, 4N for a frozen base), adapter matrices 6 per parameter. With a
      frozen embedding the first layer's input gradient is never needed: its q/k/v skip it.
    - `recompute`: `remat=full` re-runs each layer's forward in the backward except its last
      matmul (mlp/down: the backward reads its input, never its output): 2 (N_layer - N_down)
      per layer, not 2 N_layer (with LoRA on down, down too). `dots`/`dots_no_batch` save
      every projection (by name).
    - `attention`: what XLA sees, 2 matmuls x 2 x head_dim per (query, key, head) forward:
      `dot_product_attention` computes all T x S scores (masked), forward + backward 3x, +1x
      recomputed under remat full or dots_no_batch (dots saves its dots); `xla` (blocked
      `grouped_attention`) computes the key blocks up to the diagonal, 3x (its backward's
      recomputed scores merge with the forward's), 4x under remat full, 3.5x under dots.
    - `kernel`: attention in custom calls (splash), which XLA counts as 0: the causal half,
      3x (+1x under any remat), the MFU convention (the kernels' own backward does more).
    - `total`: the sum. `trained`: {"base", "adapters", "embedding"} from the state
      (`FitReport.trained_matmuls`); None: full fine-tuning.

    >>> cfg = Config(model=ModelConfig(remat="full"), data=DataConfig(seq_len=256))
    >>> p = expected_flops_per_token(cfg, "dot_product_attention")
    >>> round(p["recompute"] / p["weights"], 3)  # under 2/6: mlp/down is not recomputed
    0.147
    """
    m, t = cfg.model, cfg.data.seq_len
    attn_p, mlp_p, down_p = _matmul_params(m)
    n = m.matmul_param_count()
    if trained is None:
        trained = {"base": n, "adapters": 0, "embedding": True}
    weights = 4.0 * n + 2.0 * trained["base"] + 6.0 * trained["adapters"]
    if not trained["embedding"]:  # q, k, v of layer 0: no gradient to the embeddings
        weights -= 2.0 * m.d_model * m.resolved_head_dim * (m.n_heads + 2 * m.n_kv_heads)
    # LoRA's forward makes x A in the same product as the base output (x [A, W + A B]), and the
    # backward of an adapted down needs x A: recomputing it re-runs down's base matmul too.
    lora_down = cfg.peft.type in ("lora", "dora") and (not cfg.peft.targets or any(
        "down" in target for target in cfg.peft.targets))
    recompute = 2.0 * m.n_layers * (attn_p + mlp_p - (0 if lora_down else down_p)) if m.remat == "full" else 0.0
    fwd = 4.0 * m.n_heads * m.resolved_head_dim * m.n_layers  # per (query, key) position
    remat = m.remat != "none"
    if attention == "dot_product_attention":
        area, times = t, 3 + (m.remat in ("full", "dots_no_batch"))
    elif attention == "xla":
        # the backward's recomputed scores meet the forward's (or remat's) in one program and
        # XLA merges them; under dots/dots_no_batch only half of them merge (measured: 3.0x,
        # 4.0x with remat full, 3.5x with dots, on v5p)
        nb = t // CAUSAL_BLOCK if t % CAUSAL_BLOCK == 0 else 1
        area, times = t * (nb + 1) / (2 * nb), {"none": 3.0, "full": 4.0}.get(m.remat, 3.5)
    else:  # a kernel (or an implementation this model does not know): the MFU convention
        area, times = t / 2, 3 + remat
    att = fwd * area * times
    kernel = att if attention not in ("dot_product_attention", "xla") else 0.0
    return {"weights": weights, "recompute": recompute, "attention": att - kernel, "kernel": kernel,
            "total": weights + recompute + att}


def flops_notes(cfg: Config, attention: str, parts: dict[str, float]) -> list[str]:
    """Why XLA's count differs from 6N + causal attention for `cfg`, in words and numbers per
    token (`parts` from `expected_flops_per_token`).

    >>> flops_notes(Config(), "splash", expected_flops_per_token(Config(), "splash"))[0][:40]
    'attention runs in Pallas kernels (splash'
    """
    m, t = cfg.model, cfg.data.seq_len
    attn_p, mlp_p, down_p = _matmul_params(m)
    n = m.matmul_param_count()
    causal = 3 * 4.0 * m.n_heads * m.resolved_head_dim * m.n_layers * t / 2
    out = []
    if attention not in ("dot_product_attention", "xla"):
        out.append(f"attention runs in Pallas kernels ({attention}): XLA counts custom calls without a cost estimate "
                   f"as 0 FLOPs; the kernels' analytic causal attention is added ({parts['kernel']:.3g} per token)")
    elif attention == "dot_product_attention":
        out.append(f"attention (dot_product_attention) computes all T x S scores and masks them: "
                   f"{parts['attention']:.3g} per token vs the causal {causal:.3g} of 6N+attn")
    else:
        out.append(f"attention (xla, blocked to the diagonal, backward recomputing the scores): "
                   f"{parts['attention']:.3g} per token vs the causal {causal:.3g} of 6N+attn")
    if m.remat == "full":
        what = ("its whole forward (LoRA's x A comes with each base product, down's too)"
                if parts["recompute"] > 2.0 * m.n_layers * (attn_p + mlp_p - down_p) else
                "its forward except the mlp/down matmul (the backward never reads its output)")
        out.append(f"remat=full recomputes in each layer {what}, never the LM head: +{parts['recompute'] / n:.2f} N "
                   f"per token, not +2N, so (6N + recompute) / 6N = {(6 * n + parts['recompute']) / (6 * n):.2f}, "
                   f"not 8/6 = 1.33")
    if parts["weights"] < 5.9 * n:
        out.append(f"frozen weights get no weight gradient: {parts['weights'] / n:.2f} N instead of 6N")
    return out


def _unrolled_models(objective: Any) -> Any:
    """`objective` with every model block it holds (a distillation teacher) unrolled at its own
    depth. XLA counts a scanned body once, so a scanned teacher's FLOPs would count one layer;
    the FLOP compiles vary only the policy's depth, so the teacher's count is then whole.

    >>> _unrolled_models(DistillConfig(teacher=ModelConfig(n_layers=30))).teacher.scan_layers  # doctest: +SKIP
    False
    """
    blocks = {f.name: dataclasses.replace(getattr(objective, f.name), scan_layers=False)
              for f in dataclasses.fields(objective) if isinstance(getattr(objective, f.name), ModelConfig)}
    return dataclasses.replace(objective, **blocks) if blocks else objective


@dataclasses.dataclass
class LoweredStep:
    """A recipe's training step lowered for a topology (not yet compiled), with what the fit
    report reads beside it. `lowered.compile().as_text()` is the TPU program itself: tests read
    it to see which implementations it holds (Mosaic kernels, the attention)."""

    cfg: Config  # the recipe, with the slice count used
    generation: TpuGeneration
    n_chips: int
    n_devices: int
    shard: ShardingContext  # its `platform` is the target's ("tpu")
    setup: Any  # the abstract StateSetup
    batch: Any  # ShapeDtypeStructs with shardings
    extra: Any  # the objective's frozen extras, abstract
    lowered: Any  # jax.stages.Lowered
    lower_seconds: float


def lower_step(cfg: Config, topology: str, slices: int | None = None) -> LoweredStep:
    """Build `cfg`'s training state abstractly over `topology`'s TPU devices and lower the
    trainer's own step for them (the first half of `fit_check`).

    >>> lower_step(cfg, "v5e:2x4").lowered.compile().as_text().count("tpu_custom_call")  # doctest: +SKIP
    """
    slices = cfg.mesh.slices if slices is None else slices
    gen, grid = parse_topology(topology)
    devices = topology_devices(topology, slices)
    mesh_cfg = dataclasses.replace(cfg.mesh, slices=slices)
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh = make_mesh(mesh_cfg, devices)
    rules = rules_for(mesh_cfg)
    # The mesh is over TPU devices, so the model (and any extra model built with this context)
    # resolves `kernels`/`attention` for TPU, not for this host's CPU backend.
    shard = ShardingContext(mesh, rules)
    model = Transformer(cfg.model, shard)
    objective = build_objective(model, cfg)
    setup = build_state(model, cfg, mesh, rules, cfg.train.steps, abstract=True, objective=objective)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    n_batch_shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    if b % n_batch_shards:
        raise ValueError(f"data.batch_size={b} does not split over the {n_batch_shards} data x fsdp shards of "
                         f"{topology}; use a multiple of {n_batch_shards}.")
    batch_sh = shard.batch_shardings(objective.abstract_batch(b, t))
    batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         objective.abstract_batch(b, t), batch_sh)
    extras = build_extras(objective.extras(), shard, abstract=True)

    t0 = time.perf_counter()
    lowered = compile_train_step(objective, setup, batch_sh, cfg.optim.grad_accum, extras.shardings).lower(
        setup.state, batch, extras.values)
    return LoweredStep(cfg, gen, math.prod(grid) * slices, len(devices), shard, setup, batch, extras.values, lowered,
                       time.perf_counter() - t0)


def _compile_report(cfg: Config, topology: str, slices: int | None, memory: bool = True) -> FitReport:
    step = lower_step(cfg, topology, slices)
    cfg, gen, n_chips, shard, setup, batch, extra = (step.cfg, step.generation, step.n_chips, step.shard, step.setup,
                                                      step.batch, step.extra)
    mesh, b, t = shard.mesh, cfg.data.batch_size, cfg.data.seq_len
    t0 = time.perf_counter()
    try:
        compiled = step.lowered.compile() if memory else _compile_for_flops(step.lowered)
        compile_error = ""
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit; that is a verdict, not a crash.
        if "RESOURCE_EXHAUSTED" not in str(e) or not memory:
            raise
        compiled, compile_error = None, str(e).split("\n")[0]
    compile_s = step.lower_seconds + time.perf_counter() - t0

    state = setup.state
    arg_bytes = sum(_tree_bytes(x) for x in (state, batch, extra))
    if compiled is not None:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem_fields = dict(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                          alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                          code_bytes=int(mem.generated_code_size_in_bytes))
        flops = float(cost.get("flops", float("nan")))
        program = program_facts(compiled.as_text())
    else:  # the compiler's message states the temporaries it needed
        mem_fields = dict(argument_bytes=arg_bytes, output_bytes=0, alias_bytes=0,
                          temp_bytes=_required_temp_bytes(compile_error), code_bytes=0)
        flops, program = float("nan"), {}
    per_leaf = {f"trainable/{p}": _shard_bytes(a) for p, a in flat_paths(state.trainable).items()}
    per_leaf.update({f"frozen/{p}": _shard_bytes(a) for p, a in flat_paths(state.frozen).items()})
    opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    per_leaf.update({f"opt_state{jax.tree_util.keystr(k)}": _shard_bytes(a) for k, a in opt_leaves})
    biggest = sorted(per_leaf.items(), key=lambda kv: -kv[1])[:5]

    n_params = cfg.model.param_count()
    n_trainable = sum(math.prod(a.shape) for a in jax.tree.leaves(state.trainable))
    model_flops = cfg.model.flops_per_token(t) * b * t
    hbm = int(gen.hbm_bytes * n_chips / step.n_devices)  # v4 libtpu shows 2 devices (cores) per chip
    report = FitReport(
        topology=topology, accelerator=slice_name(topology, cfg.mesh.slices), generation=gen, n_devices=step.n_devices,
        n_chips=n_chips, mesh=dict(mesh.shape), params=n_params, trainable=n_trainable, tokens_per_step=b * t,
        trainable_bytes=_tree_bytes(state.trainable), frozen_bytes=_tree_bytes(state.frozen),
        opt_state_bytes=_tree_bytes(state.opt_state), batch_bytes=_tree_bytes(batch),
        extra_model_bytes=_tree_bytes(extra),
        **mem_fields, hbm_bytes=hbm, xla_flops=flops, model_flops=model_flops, compile_seconds=compile_s,
        biggest=biggest, suggestions=[], compile_error=compile_error, seams=seams(cfg, shard.platform),
        program=program, trained_matmuls=trained_matmuls(cfg.model, state.trainable))
    report.suggestions = suggestions(report, cfg)
    return report


def _compile_for_flops(lowered: Any) -> Any:
    """`lowered` compiled with `FLOP_COMPILE_OPTIONS`; without them where this libtpu does not
    know them (`program_facts` then shows the windowed einsum loops that remain)."""
    try:
        return lowered.compile(compiler_options=FLOP_COMPILE_OPTIONS)
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" not in str(e):
            raise
        return lowered.compile()


_WHILE = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = .*? while\(.*?body=%?([\w.-]+)", re.MULTILINE)


def program_facts(hlo_text: str) -> dict:
    """What a compiled program's text says about its FLOP count: the attention implementations
    it holds (`attend` names them in a scope: `attention_splash`, ...), its while loops (XLA's
    cost analysis counts a loop body once) by body name, and how many are the TPU's windowed
    einsum loops (collective matmuls).

    >>> program_facts('%w = (s32[]) while(%t), condition=%c, body=%b.1\\n op_name="jit(step)/attention_xla/dot"')
    {'attention': ['xla'], 'loops': 1, 'loop_ops': ['b.1'], 'windowed_einsum_loops': 0}
    """
    bodies = _WHILE.findall(hlo_text)
    return {"attention": sorted(set(re.findall(r"/attention_(\w+?)/", hlo_text))), "loops": len(bodies),
            "loop_ops": sorted(set(bodies))[:4],
            "windowed_einsum_loops": sum("windowed_dot_general" in body for body in bodies)}


def trained_matmuls(model: ModelConfig, trainable: Any) -> dict:
    """Matmul parameters among `trainable` (a state's trainable tree): `base`, the model's own
    weight matrices (every `.../kernel`, and the tied embedding, which is the LM head);
    `adapters`, other matrices (LoRA's A and B, ...; not the untied token embedding, a gather,
    nor vectors such as norm scales); `embedding`: whether the token embedding trains.

    >>> trained_matmuls(ModelConfig(tie_embeddings=False), {"lm_head": {"kernel": jnp.zeros((4, 8))},
    ...                                                      "q": {"lora_a": jnp.zeros((4, 2))}})
    {'base': 32, 'adapters': 8, 'embedding': False}
    """
    out = {"base": 0, "adapters": 0, "embedding": False}
    for path, a in flat_paths(trainable).items():
        if path.endswith("embed/embedding"):
            out["embedding"] = True
            if model.tie_embeddings:
                out["base"] += math.prod(a.shape)
        elif path.endswith("/kernel") or path == "kernel":
            out["base"] += math.prod(a.shape)
        elif len(a.shape) - (path.split("/")[0] == "layers") >= 2:  # scanned leaves carry a layers axis
            out["adapters"] += math.prod(a.shape)
    return out


def seams(cfg: Config, platform: str) -> dict[str, str]:
    """What the backend-dependent seams of `cfg`'s training forward compile to on `platform`:
    the linear seam's LoRA matmul (`model.kernels`; used only with LoRA/DoRA adapters, and not
    with LoRA dropout, whose A sees another x than W) and attention (`model.attention`).

    >>> seams(Config(peft=PeftConfig(type="lora")), "tpu")
    {'kernels': 'pallas-tpu (Mosaic)', 'attention': 'dot_product_attention'}
    """
    kernels = describe_kernels(cfg.model.kernels, platform)
    if cfg.peft.type not in ("lora", "dora"):
        kernels += " (unused: no LoRA adapters)"
    elif cfg.peft.dropout and kernels != "xla":
        kernels = "xla (peft.dropout > 0 keeps LoRA on the XLA path)"
    return {"kernels": kernels, "attention": resolve_attention(cfg.model.attention, platform)}


def _required_temp_bytes(message: str) -> int:
    """Bytes from XLA's "... required for HLO temporaries (69.34G) exceeds available HBM ..."."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    if not m:
        return 0
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _shard_bytes(a: jax.ShapeDtypeStruct) -> int:
    """Bytes of the largest shard of `a` on one device."""
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    return math.prod(shape) * jnp.dtype(a.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
    return sum(_shard_bytes(a) for a in jax.tree.leaves(tree))


def suggestions(r: FitReport, cfg: Config) -> list[str]:
    """Concrete changes that cut per-device memory, biggest expected saving first."""
    out: list[tuple[float, str]] = []
    limit = HBM_HEADROOM * r.hbm_bytes
    weights = r.trainable_bytes + r.frozen_bytes + r.opt_state_bytes
    shards_now = {"dp": 1, "fsdp": r.mesh["fsdp"], "fsdp_tp": r.mesh["fsdp"] * r.mesh["tensor"]}[cfg.mesh.preset]
    per_slice = r.n_devices // max(cfg.mesh.slices, 1)
    if shards_now < per_slice:
        saved = weights * (1 - shards_now / per_slice)
        out.append((saved, f"shard weights and optimizer state over all {per_slice} devices of a slice "
                           f"(mesh.preset=fsdp, mesh.fsdp=-1, mesh.data=1): about {saved / GIB:.1f} GiB less per device"))
    if cfg.peft.type == "none" and r.opt_state_bytes > 0.2 * r.total_bytes:
        saved = r.opt_state_bytes + r.trainable_bytes / 2  # moments gone; bf16 base could halve weights too
        out.append((saved, f"LoRA instead of full fine-tuning (peft.type=lora): optimizer state "
                           f"{r.opt_state_bytes / GIB:.1f} GiB -> about 0, gradients shrink with it"))
    if r.temp_bytes > 0.25 * r.total_bytes:
        if cfg.model.remat == "none":
            out.append((r.temp_bytes * 0.6, f"rematerialise activations (model.remat=full, or dots_no_batch): "
                                              f"temporaries are {r.temp_bytes / GIB:.1f} GiB"))
        k = 2 * cfg.optim.grad_accum
        if cfg.data.batch_size % k == 0:
            out.append((r.temp_bytes * 0.4, f"split the batch into microbatches (optim.grad_accum={k}): activation "
                                              f"memory falls roughly in proportion, same effective batch"))
    if cfg.model.param_dtype == "float32" and weights > 0.3 * r.total_bytes:
        out.append((weights / 4, "bfloat16 weights and optimizer moments (model.param_dtype=bfloat16): "
                                 f"about {weights / 2 / GIB:.1f} GiB less (watch update precision)"))
    if not r.fits:
        need = math.ceil(r.n_chips * r.total_bytes / limit)
        out.append((0.0, f"or a larger slice: at ~{r.total_bytes / GIB:.1f} GiB per device this step needs "
                         f"roughly {need}+ {r.generation.name} chips if memory scales with 1/chips"))
    out.sort(key=lambda x: -x[0])
    return [s for _, s in out] if (not r.fits or r.total_bytes > 0.75 * r.hbm_bytes) else []
