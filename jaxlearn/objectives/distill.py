"""Knowledge distillation (`objective.type: distill`): a student learns from a frozen teacher,
through the one step.

The teacher is a frozen extra model (`FrozenModel`, `Objective.extras`) with its own model
block: another depth or width, the same vocabulary (a mismatch is a ConfigError). Per scored
token the loss is

    distill_weight * T^2 D(p_teacher^T, q_student^T)          (D: forward_kl | reverse_kl | jsd)
  + ce_weight * cross-entropy(targets)                        (the hard labels)
  + feature_weight * mean over layer pairs of || rms(h_s W) - rms(h_t) ||^2 / D_teacher

- **Logits.** With `loss_chunk` > 0 and bare LM heads, the student's and the teacher's logits
  are made `loss_chunk` tokens at a time from their hidden states (and re-made in the backward),
  so neither [tokens, vocab] array exists whole. `top_k` > 0 computes the loss on the teacher's
  top-k tokens plus one tail bucket (`distill_losses.py` documents the approximation: a lower
  bound of the exact loss, equal at k = vocabulary).
- **Features.** `feature_layers` pairs (student layer, teacher layer), 0-based; their residual
  streams (after that layer) are compared through a learned projection per pair, an
  objective-owned head `params["heads"]["feature_proj"]` [pairs, D_s, D_t] initialised to the
  (rectangular) identity. Both sides are RMS-normalised without a scale, so the deep layers'
  large activations do not dominate. Empty: every student layer i is paired with teacher layer
  (i + 1) * L_t // L_s - 1 (the end of the block of teacher layers it stands for).
- **On-policy (GKD).** `on_policy` > 0: `prepare` replaces that fraction of each batch's rows by
  the student's own continuations of the rows' first `prompt_len` tokens, sampled with the
  current weights (the jitted sampler); the teacher scores them in the step like any other row.
  The hard-label term skips those rows (feature `offline`). `prepare` runs for held-out batches
  too, so a recipe's held-out numbers are on-policy there as well: measure perplexity with
  `on_policy=0` (or `jaxlearn eval`).

Metrics (sums, divided by the scored tokens like the loss): `kd` (the divergence, T^2 included),
`ce` (held-out perplexity is exp(ce)), and `feature` when used. Example::

    cfg = load_config("configs/distill_smollm2_brown.yaml")
    loss_sum, n_tokens, metrics = build_objective(model, cfg)(params, batch, rng, extras)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxlearn.config import ConfigError, ModelConfig, ObjectiveConfig
from jaxlearn.models.transformer import Transformer, plain_lm_head
from jaxlearn.objectives import distill_losses as L
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import DEFAULT_LOSS_CHUNK
from jaxlearn.objectives.forward import hidden_states, model_params, token_cross_entropy
from jaxlearn.train.extras import FrozenModel


@dataclasses.dataclass(frozen=True)
class DistillConfig(ObjectiveConfig):
    """`distill`: token-level (and optionally feature) distillation from a frozen teacher."""

    type: str = "distill"
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd: mixing weight; 0 -> forward KL, 1 -> reverse KL
    temperature: float = 1.0  # both softmaxes at T; the divergence is multiplied by T^2
    distill_weight: float = 1.0
    ce_weight: float = 0.0  # hard-label cross-entropy mixed in
    # > 0: the loss on the teacher's top-k tokens + one tail bucket (a lower bound; exact at k = V)
    top_k: int = 0
    # > 0: both LM heads run this many tokens at a time (no [tokens, vocab] logits exist whole)
    loss_chunk: int = DEFAULT_LOSS_CHUNK
    # The teacher's model block: architecture and weights (teacher.init_from: a preset, .gguf,
    # Hugging Face directory or jaxlearn run directory). Same vocab_size as the student.
    teacher: ModelConfig = ModelConfig()
    teacher_seed: int = 0  # without teacher.init_from: a fresh teacher from this seed (tests)
    feature_weight: float = 0.0
    feature_layers: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) pairs
    on_policy: float = 0.0  # fraction of each batch's rows replaced by student samples (GKD)
    prompt_len: int = 16  # on-policy: the rows' first tokens the student continues
    sample_temperature: float = 1.0  # on-policy sampling temperature
    seed: int = 0  # on-policy sampling

    def __post_init__(self):
        def need(name, ok, fix):
            if not ok:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} is out of range; {fix}.")

        need("beta", 0.0 <= self.beta <= 1.0, "use a mixing weight in [0, 1], e.g. 0.5")
        need("temperature", self.temperature > 0, "use a positive temperature, e.g. 1.0 or 2.0")
        for name in ("distill_weight", "ce_weight", "feature_weight"):
            need(name, getattr(self, name) >= 0, "use 0 (off) or a positive weight")
        need("top_k", self.top_k >= 0, "use 0 (the exact loss) or a token count such as 64")
        need("loss_chunk", self.loss_chunk >= 0, "use 0 (off) or a token count such as 256")
        need("on_policy", 0.0 <= self.on_policy <= 1.0, "use a fraction of each batch in [0, 1]")
        need("prompt_len", self.prompt_len >= 1, "use a positive number of prompt tokens")
        need("sample_temperature", self.sample_temperature >= 0, "use 0 (greedy) or a positive temperature")


def layer_pairs(cfg: DistillConfig, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """The (student layer, teacher layer) pairs of the feature loss (0-based, checked).

    >>> layer_pairs(DistillConfig(), 3, 6)
    ((0, 1), (1, 3), (2, 5))
    """
    pairs = cfg.feature_layers or tuple((i, (i + 1) * teacher_layers // student_layers - 1)
                                        for i in range(student_layers))
    for s, t in pairs:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ConfigError(f"objective.feature_layers: pair ({s}, {t}) is out of range; student layers are "
                              f"0..{student_layers - 1} (model.n_layers), teacher layers 0..{teacher_layers - 1} "
                              "(objective.teacher.n_layers).")
    return tuple(pairs)


def _run_layers(module, x, positions, segment_ids):
    # The decoder layers alone on a residual stream: what `Transformer.hidden` does between the
    # embedding and the final norm (no cache, no prefix).
    b, t = segment_ids.shape
    q_idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    if module.cfg.scan_layers:
        return module.layers(x, positions, segment_ids, q_idx, segment_ids, 0, None, None)[0]
    for layer in module.layers:
        x = layer(x, positions, segment_ids, q_idx, segment_ids, 0, None, None)[0]
    return x


def layer_states(model: Transformer, params: dict, batch: dict, layers: tuple[int, ...],
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[int, jax.Array]]:
    """(final-norm hidden states [B, T, D], {layer: residual stream after it [B, T, D]}) in one
    pass: the layer stack runs in segments that end at the requested layers. Prefix/prompt
    tuning leaves are not applied (feature distillation refuses them).

    >>> h, states = layer_states(model, params, batch, (0, 2))       # doctest: +SKIP
    """
    cfg, p = model.cfg, model_params(params)
    rngs = {"dropout": rng} if rng is not None else None
    args = (batch["positions"], batch["segment_ids"])
    x = model.apply({"params": p}, batch["inputs"], method=lambda m, tok: m.embed(tok))
    states, start = {}, 0
    for end in sorted(set(i + 1 for i in layers)) + [cfg.n_layers]:
        if end > start:
            sub = Transformer(dataclasses.replace(cfg, n_layers=end - start), model.shard)
            if cfg.scan_layers:
                sp = {"layers": jax.tree.map(lambda a: a[start:end], p["layers"])}
            else:
                sp = {f"layers_{i - start}": p[f"layers_{i}"] for i in range(start, end)}
            if rng is not None:  # a distinct dropout stream per segment
                rngs = {"dropout": jax.random.fold_in(rng, start)}
            x = sub.apply({"params": sp}, x, *args, rngs=rngs, method=_run_layers)
            start = end
        if end - 1 in layers:
            states[end - 1] = x
    h = model.apply({"params": p}, x, method=lambda m, y: m.final_norm(y))
    return h, states


def _rms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def _head_logits(h: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32)


class Distill(Objective):
    """Student (the policy) <- frozen teacher (`extras["teacher"]`); see the module docstring."""

    Config = DistillConfig

    def __init__(self, model, cfg, run=None):
        super().__init__(model, cfg, run)
        t, s = cfg.teacher, model.cfg
        if t.vocab_size != s.vocab_size:
            raise ConfigError(f"objective.teacher.vocab_size={t.vocab_size} differs from model.vocab_size="
                              f"{s.vocab_size}: teacher and student must share the tokenizer and its vocabulary. "
                              "Use a student with the teacher's tokenizer (data.tokenizer) and set both to the same "
                              "vocab_size.")
        self.teacher = Transformer(t, model.shard)
        self.pairs = layer_pairs(cfg, s.n_layers, t.n_layers) if cfg.feature_weight else ()
        if self.pairs and self.run.peft.type in ("prefix", "prompt"):
            raise ConfigError(f"objective.feature_weight > 0 reads the layers' residual streams, which peft.type="
                              f"{self.run.peft.type} changes through the attention prefix; use another peft.type "
                              "or objective.feature_weight=0.")
        if cfg.top_k > s.vocab_size:
            raise ConfigError(f"objective.top_k={cfg.top_k} exceeds the vocabulary ({s.vocab_size}); use at most "
                              f"{s.vocab_size} (= the exact loss) or 0.")
        if cfg.on_policy and cfg.prompt_len >= self.run.data.seq_len:
            raise ConfigError(f"objective.prompt_len={cfg.prompt_len} leaves nothing to sample in data.seq_len="
                              f"{self.run.data.seq_len}; use a shorter prompt.")

    # ---- seams ------------------------------------------------------------------------------

    def extras(self):
        return {"teacher": FrozenModel(self.cfg.teacher, seed=self.cfg.teacher_seed)}

    def init_heads(self, key):
        if not self.pairs:
            return None
        eye = jnp.eye(self.model.cfg.d_model, self.cfg.teacher.d_model, dtype=jnp.float32)
        return {"feature_proj": {"kernel": jnp.broadcast_to(eye, (len(self.pairs),) + eye.shape)}}

    def head_axes(self):
        return {"feature_proj": {"kernel": (None, "embed", None)}} if self.pairs else None

    def prepare(self, batch, state):
        if not self.cfg.on_policy:
            return batch
        b = batch["inputs"].shape[0]
        n = max(1, round(self.cfg.on_policy * b))
        offline = (jnp.arange(b) >= n).astype(jnp.float32)
        if state is None:  # abstract shapes (ahead-of-time compiles): the rows keep their shapes
            return {**batch, "offline": offline}
        from jaxlearn.models.generate import SamplingConfig, rollout_batch, sample

        p, t = self.cfg.prompt_len, batch["inputs"].shape[1]
        tokens = batch["inputs"][:n, :p]
        seg = jnp.ones_like(tokens)  # the first p tokens as one document (a packed boundary is just text)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), tokens.shape)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), state.step)
        sampling = SamplingConfig(max_new_tokens=t - p, temperature=self.cfg.sample_temperature)
        on = rollout_batch(tokens, seg, pos, sample(self.model, model_params(state.params), tokens, seg, pos, rng,
                                                    sampling))
        out = {k: jnp.concatenate([on[k].astype(v.dtype), v[n:]], axis=0) if k in on else v for k, v in batch.items()}
        return {**out, "offline": offline}

    # ---- the loss ---------------------------------------------------------------------------

    def token_terms(self, params: dict, teacher_params: dict, h_s: jax.Array, h_t: jax.Array,
                    targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-token (divergence, cross-entropy), each [B, T], from the final hidden states
        [B, T, D_s] and [B, T, D_t] of the student and the teacher."""
        cfg = self.cfg

        def terms(z_s, z_t, tgt):  # [n, V] logits -> ([n], [n])
            if cfg.top_k:
                top = L.teacher_topk(z_t, cfg.top_k, cfg.temperature)
                div = L.topk_token_divergence(z_s, top, cfg.kind, cfg.temperature, cfg.beta)
            else:
                div = L.token_divergence(z_s, z_t, cfg.kind, cfg.temperature, cfg.beta)
            return div, token_cross_entropy(z_s, tgt)[0]

        b, t = targets.shape
        head_s = plain_lm_head(self.model.cfg, model_params(params)) if cfg.loss_chunk else None
        head_t = plain_lm_head(self.teacher.cfg, teacher_params) if cfg.loss_chunk else None
        if head_s is None or head_t is None:  # logits whole (no chunking, or adapters on the head)
            z_s = self.model.apply({"params": model_params(params)}, h_s, method="logits")
            z_t = self.teacher.apply({"params": teacher_params}, h_t, method="logits")
            div, ce = terms(z_s.reshape(b * t, -1), z_t.reshape(b * t, -1), targets.reshape(-1))
            return div.reshape(b, t), ce.reshape(b, t)
        n, c = b * t, cfg.loss_chunk
        n_chunks = -(-n // c)

        def chunks(x):  # [B, T, ...] -> [n_chunks, c, ...], zero-padded
            x = x.reshape((n,) + x.shape[2:])
            pad = n_chunks * c - n
            return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((n_chunks, c) + x.shape[1:])

        @jax.checkpoint  # the backward re-makes each chunk's logits instead of keeping them
        def one(xs):
            hs, ht, tgt = xs
            return terms(_head_logits(hs, *head_s), _head_logits(ht, *head_t), tgt)

        div, ce = jax.lax.map(one, (chunks(h_s), chunks(h_t), chunks(targets)))
        return div.reshape(-1)[:n].reshape(b, t), ce.reshape(-1)[:n].reshape(b, t)

    def loss(self, params, batch, rng, extras):
        cfg = self.cfg
        teacher_params = jax.lax.stop_gradient(extras["teacher"])
        mask = batch["loss_mask"].astype(jnp.float32)
        metrics = {}
        if self.pairs:
            h_s, f_s = layer_states(self.model, params, batch, tuple(s for s, _ in self.pairs), rng)
            h_t, f_t = layer_states(self.teacher, teacher_params, batch, tuple(u for _, u in self.pairs))
            proj = params["heads"]["feature_proj"]["kernel"]
            sq = 0.0
            for i, (s, u) in enumerate(self.pairs):
                diff = _rms(f_s[s].astype(jnp.float32) @ proj[i]) - _rms(jax.lax.stop_gradient(f_t[u]))
                sq = sq + jnp.mean(jnp.square(diff), axis=-1)
            metrics["feature"] = jnp.sum(sq * mask) / len(self.pairs)
        else:
            h_s = hidden_states(self.model, params, batch, rng)
            h_t = hidden_states(self.teacher, teacher_params, batch)
        h_t = jax.lax.stop_gradient(h_t)
        div, ce = self.token_terms(params, teacher_params, h_s, h_t, batch["targets"])
        kd = jnp.sum(div * mask)
        ce_mask = mask * batch["offline"][:, None] if "offline" in batch else mask
        metrics["kd"], metrics["ce"] = kd, jnp.sum(ce * ce_mask)
        total = cfg.distill_weight * kd + cfg.ce_weight * metrics["ce"]
        if self.pairs:
            total = total + cfg.feature_weight * metrics["feature"]
        return total, jnp.sum(mask), metrics
