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
from jaxlearn.models.layers import resolve_attention
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
    xla_flops: float  # per device per step, XLA's cost analysis
    model_flops: float  # per step, whole slice: (6 N + attention) x tokens
    compile_seconds: float
    biggest: list[tuple[str, int]]  # largest per-device argument leaves
    suggestions: list[str]
    compile_error: str = ""  # the TPU compiler's out-of-memory message, when it refused the step
    # what each backend-dependent seam of the forward compiled to on the target, e.g.
    # {"kernels": "pallas-tpu (Mosaic)", "attention": "dot_product_attention"}
    seams: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Peak per-device HBM of the step: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return not self.compile_error and self.total_bytes <= HBM_HEADROOM * self.hbm_bytes

    @property
    def flops_ratio(self) -> float:
        """XLA's FLOPs over the whole slice / the analytic (6 N + attention) model FLOPs."""
        return self.xla_flops * self.n_devices / self.model_flops

    @property
    def step_seconds_at_peak(self) -> float:
        """Step time if every chip ran the model FLOPs at its bf16 peak (100 % MFU)."""
        return self.model_flops / (self.n_chips * self.generation.peak_bf16_tflops * 1e12)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["generation"] = self.generation.name
        d.update(total_bytes=self.total_bytes, fits=self.fits, flops_ratio=self.flops_ratio,
                 step_seconds_at_peak=self.step_seconds_at_peak)
        return d

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
            f"FLOPs per step: XLA {self.xla_flops * self.n_devices:.3e} (all devices) vs model 6N+attn "
            f"{self.model_flops:.3e}: ratio {self.flops_ratio:.2f}",
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

    XLA's cost analysis counts the body of a loop once, so with `scan_layers` its FLOPs miss
    all but one layer. With `count_flops`, two more compiles of the same step with 1 and 2
    unrolled layers give the per-layer FLOPs, and the step's count is extrapolated to all
    layers (exact for identical layers); without it `xla_flops` is NaN. A teacher in the
    objective's config is unrolled whole in those two compiles, so its forward is counted.
    Other loops are still counted once: with `loss_chunk` the LM head's chunk loop counts one
    chunk of the head's FLOPs.
    """
    report = _compile_report(cfg, topology, slices)
    if count_flops:
        small = lambda n: dataclasses.replace(cfg, model=dataclasses.replace(  # noqa: E731
            cfg.model, n_layers=n, scan_layers=False), objective=_unrolled_models(cfg.objective))
        f1 = _compile_report(small(1), topology, slices, memory=False).xla_flops
        f2 = _compile_report(small(2), topology, slices, memory=False).xla_flops
        report.xla_flops = f1 + (cfg.model.n_layers - 1) * (f2 - f1)
    else:
        report.xla_flops = float("nan")
    return report


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
        compiled = step.lowered.compile()
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
    else:  # the compiler's message states the temporaries it needed
        mem_fields = dict(argument_bytes=arg_bytes, output_bytes=0, alias_bytes=0,
                          temp_bytes=_required_temp_bytes(compile_error), code_bytes=0)
        flops = float("nan")
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
        biggest=biggest, suggestions=[], compile_error=compile_error, seams=seams(cfg, shard.platform))
    report.suggestions = suggestions(report, cfg)
    return report


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
