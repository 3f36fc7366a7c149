"""RL from feedback through the one step: GRPO and its RLOO / Dr. GRPO variants (`objective.type: grpo`).

No trainer of its own. Per step:

1. **Rollout** (`prepare`, outside the compiled step): the feed's batch of B prompts
   (`data.format: prompts`, jaxlearn/data/prompts.py) is repeated `group_size` times, and the
   jitted sampler (`jaxlearn.models.generate.sample`) continues every row from the CURRENT
   weights (no copy), keeping the behaviour log-probs of the sampled tokens.
2. **Rewards** on the host: the responses are decoded and scored by `objective.rewards`
   (weighted terms of `jaxlearn.rewards`, against each prompt's record: its accept-set).
3. **Advantages** per group (`rl_losses.group_advantages`: grpo | rloo | dr_grpo).
4. **Loss** (`loss`, inside the step): the token-level clipped ratio surrogate against the
   behaviour log-probs, plus `kl_coef` * the k3 estimate of KL(policy || reference). The
   reference is `Objective.reference_params`: with PEFT the base with adapters off (no second
   copy), with full fine-tuning a frozen copy of the starting weights.

The step sees B * group_size rows of data.seq_len + max_new_tokens tokens:

    inputs, targets, segment_ids, positions  int32   [R, T]   prompt (left-padded) + response
    loss_mask                                float32 [R, T]   1.0 on response targets
    old_logprobs                             float32 [R, T]   behaviour log-probs, aligned with targets
    advantages, rewards                      float32 [R]

Normalisation: every row's token sum is divided by the constant `max_new_tokens` and the step
divides by the row count (Dr. GRPO's constant normaliser: no length bias, and gradient
accumulation stays exact). So every metric is a mean over rows: `reward`, `response_len`
(tokens), `kl` (the per-sequence KL: k3 summed over the response), `clip_frac` and `ratio`
(per-row means over tokens) and `entropy` (the sampled tokens' mean negative log-prob: an
unbiased estimate of the policy entropy at temperature 1 without top_p). Held-out batches are
sampled too, so the held-out `reward` is the current policy's. Example::

    cfg = load_config("configs/grpo_smollm2_antonyms.yaml")
    batch = objective.prepare(global_prompt_batch, state)            # the rollout
    loss_sum, rows, metrics = objective(params, batch, rng, extras)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlearn.config import ConfigError, ObjectiveConfig
from jaxlearn.objectives import rl_losses as L
from jaxlearn.objectives.base import Objective
from jaxlearn.objectives.chunked_loss import DEFAULT_LOSS_CHUNK
from jaxlearn.objectives.forward import hidden_states, model_params, token_logprobs


def _check_rollout(cfg, need) -> None:
    """The sampling and reward keys GRPO and PPO share, checked once for both."""
    need("temperature", cfg.temperature > 0, "sample with a positive temperature, e.g. 1.0")
    need("top_p", 0 < cfg.top_p <= 1, "use a nucleus mass in (0, 1]")
    need("max_new_tokens", cfg.max_new_tokens >= 1, "sample at least one token")
    need("loss_chunk", cfg.loss_chunk >= 0, "use 0 (off) or a token count such as 256")
    need("reward_weights", len(cfg.reward_weights) in (0, len(cfg.rewards)),
         f"give one weight per objective.rewards term ({len(cfg.rewards)}), or none (all 1.0)")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ObjectiveConfig):
    """`grpo`: group-relative policy optimisation with a clipped ratio and a k3 KL leash."""

    type: str = "grpo"
    group_size: int = 4  # samples per prompt
    advantage: Literal["grpo", "rloo", "dr_grpo"] = "grpo"
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    report_kl: bool = True  # compute the KL metric (a reference forward) even when kl_coef is 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_at_end_of_turn: bool = True  # stop at the tokenizer's eos / end-of-turn tokens
    stop_tokens: tuple[int, ...] = ()  # more stop token ids
    # terms of jaxlearn.rewards (accept | exact | format | length), summed with reward_weights
    # (empty: all 1.0). Two flat lists, because the recipe parser mis-reads lists of pairs.
    rewards: tuple[str, ...] = ("accept",)
    reward_weights: tuple[float, ...] = ()
    max_words: int = 3  # the `format` term's bare-answer length
    target_chars: int = 24  # the `length` term's budget
    loss_chunk: int = DEFAULT_LOSS_CHUNK  # > 0: the LM head runs this many tokens at a time
    seed: int = 0  # sampling

    def __post_init__(self):
        def need(name, ok, fix):
            if not ok:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} is out of range; {fix}.")

        need("group_size", self.group_size >= 2 if self.advantage == "rloo" else self.group_size >= 1,
             "use several samples per prompt, e.g. 4 (rloo needs at least 2)")
        need("clip_eps", self.clip_eps > 0, "use a positive clip range, e.g. 0.2")
        need("kl_coef", self.kl_coef >= 0, "use 0 (no leash) or a positive weight, e.g. 0.04")
        _check_rollout(self, need)


class GRPO(Objective):
    """Rollouts in `prepare`, the clipped surrogate + k3 KL in `loss` (see the module docstring)."""

    Config = GRPOConfig

    def __init__(self, model, cfg, run=None):
        super().__init__(model, cfg, run)
        from jaxlearn.rewards import make_reward

        try:  # fail when the recipe is read, not mid-run
            weights = cfg.reward_weights or (1.0,) * len(cfg.rewards)
            self.reward_fn = make_reward(list(zip(cfg.rewards, weights)), max_words=cfg.max_words, target_chars=cfg.target_chars)
        except ValueError as e:
            raise ConfigError(f"objective.rewards: {e}") from None
        self._host: dict[str, Any] = {}  # lazily: tokenizer, records (per objective, not global)

    # ---- host-side pieces -------------------------------------------------------------------

    def tokenizer(self) -> Any:
        if "tok" not in self._host:
            from jaxlearn.data.run_tokenizer import resolve_tokenizer

            self._host["tok"] = resolve_tokenizer(self.run.data, self.run.train.run_dir, may_train=False)
        return self._host["tok"]

    def records(self) -> list:
        if "records" not in self._host:
            from jaxlearn.data.prompts import prompt_records

            self._host["records"] = prompt_records(self.run.data)
        return self._host["records"]

    def sampling(self):
        """The sampler's settings (static: one compile per shape)."""
        from jaxlearn.models.generate import SamplingConfig

        stops, pad = tuple(self.cfg.stop_tokens), 0
        if self.cfg.stop_at_end_of_turn:
            from jaxlearn.data.chat import stop_ids

            tok = self.tokenizer()
            stops += stop_ids(tok) if hasattr(tok, "special_tokens") else (tok.eos_id,)
            pad = tok.pad_id or 0
        return SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                              top_p=self.cfg.top_p, stop_tokens=tuple(sorted(set(stops))), pad_id=pad)

    def score(self, prompt_bp: np.ndarray, response_bn: np.ndarray, mask_bn: np.ndarray, done_b: np.ndarray,
              record_index_b: np.ndarray) -> np.ndarray:
        """float32 [R] rewards of the sampled rows (host numpy in): decode, then `objective.rewards`
        against each row's prompt record. Override to score tokens directly (tests do)."""
        from jaxlearn.rewards import score_batch

        tok, records = self.tokenizer(), self.records()
        lengths = mask_bn.sum(axis=1).astype(int) - done_b.astype(int)  # the stop token is not text
        responses = [tok.decode(row[:k].tolist()) for row, k in zip(response_bn, lengths)]
        prompts = [tok.decode([t for t in row.tolist() if t != 0]) for row in prompt_bp]
        recs = [records[int(i)].as_record() for i in record_index_b]
        return score_batch(self.reward_fn, prompts, responses, recs)

    # ---- seams ------------------------------------------------------------------------------

    def extras(self):
        return self.reference_extras()

    def prepare(self, batch, state):
        out, rewards = self.rollout(batch, state)
        out["rewards"] = rewards
        out["advantages"] = L.group_advantages(rewards, self.cfg.group_size, self.cfg.advantage)
        return out

    def rollout(self, batch: dict, state: Any) -> tuple[dict, jax.Array]:
        """The shared first half of an RL `prepare` (GRPO and PPO): each prompt `group_size`
        times (consecutive rows), sampled from the current weights, scored on the host.
        Returns (the five token features + `old_logprobs` [R, T], rewards float32 [R]).

        >>> out, rewards = objective.rollout(global_prompt_batch, state)   # doctest: +SKIP
        """
        if state is None:
            raise ValueError(f"{self.cfg.type}.prepare samples from the current weights; use abstract_batch for shapes.")
        from jaxlearn.models.generate import rollout_batch, sample

        g = self.cfg.group_size
        # Each prompt g times, consecutive rows: a group is rows [i*g, (i+1)*g).
        tokens, seg, pos = (jnp.repeat(batch[k], g, axis=0) for k in ("inputs", "segment_ids", "positions"))
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), state.step)
        ro = sample(self.model, model_params(state.params), tokens, seg, pos, rng, self.sampling())
        out = rollout_batch(tokens, seg, pos, ro)
        r, p = tokens.shape
        # Behaviour log-probs where their targets sit: response token j is the target of column p - 1 + j.
        out["old_logprobs"] = jnp.concatenate([jnp.zeros((r, p - 1)), ro.logprobs, jnp.zeros((r, 1))], axis=1)
        rec = batch["record_index"] if "record_index" in batch else np.zeros(batch["inputs"].shape[0], np.int32)
        # Rewards read text: the sampled tokens come to the host (prepare is outside the step).
        prompts_b, resp, mask, done, rec_b = jax.device_get((batch["inputs"], ro.tokens, ro.mask, ro.done, rec))
        rewards = self.score(np.repeat(prompts_b, g, axis=0), resp, mask, done, np.repeat(rec_b, g, axis=0))
        return out, jnp.asarray(rewards, jnp.float32)

    def abstract_batch(self, batch_size, seq_len):
        r, t = batch_size * self.cfg.group_size, seq_len + self.cfg.max_new_tokens
        shapes = {k: ((r, t), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        shapes.update(loss_mask=((r, t), jnp.float32), old_logprobs=((r, t), jnp.float32),
                      rewards=((r,), jnp.float32), advantages=((r,), jnp.float32))
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}

    # ---- the loss ---------------------------------------------------------------------------

    def loss(self, params, batch, rng, extras):
        cfg = self.cfg
        mask = batch["loss_mask"].astype(jnp.float32)
        lp = token_logprobs(self.model, params, batch, rng, chunk=cfg.loss_chunk)
        pg, clipped, ratio = L.clipped_surrogate(lp, batch["old_logprobs"], batch["advantages"], mask, cfg.clip_eps)
        n_b = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        total = jnp.sum(pg) / cfg.max_new_tokens
        metrics = {
            "reward": jnp.sum(batch["rewards"]),
            "response_len": jnp.sum(mask),
            "clip_frac": jnp.sum(jnp.sum(clipped, -1) / n_b),
            "ratio": jnp.sum(jnp.sum(ratio * mask, -1) / n_b),
            "entropy": jnp.sum(jnp.sum(-batch["old_logprobs"] * mask, -1) / n_b),
        }
        if cfg.kl_coef > 0 or cfg.report_kl:
            ref_lp = jax.lax.stop_gradient(token_logprobs(self.model, self.reference_params(params, extras), batch,
                                                          chunk=cfg.loss_chunk))
            kl_bt = L.k3_kl(lp, ref_lp) * mask
            metrics["kl"] = jnp.sum(kl_bt)
            total = total + cfg.kl_coef * jnp.sum(kl_bt) / cfg.max_new_tokens
        return total, jnp.asarray(mask.shape[0], jnp.float32), metrics


# ---- PPO ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOConfig(ObjectiveConfig):
    """`ppo`: a value head, GAE, clipped policy and value losses, and a reward-shaping KL leash.

    The sampling and reward keys mean what they mean for `grpo` (PPO reuses its rollout)."""

    type: str = "ppo"
    group_size: int = 1  # samples per prompt (the value head is the baseline, so 1 is enough)
    clip_eps: float = 0.2  # policy ratio clip
    vf_coef: float = 0.1  # weight of the value loss
    vf_clip: float = 0.2  # value clip range around the rollout-time values
    kl_coef: float = 0.05  # per-token reward shaping: r_t -= kl_coef * (log pi - log pi_ref)
    report_kl: bool = True  # compute the KL metric (a reference forward) even when kl_coef is 0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # zero mean, unit std over the batch's response tokens
    ppo_epochs: int = 1  # updates per rollout batch: only 1 for now (see PPO's docstring)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_at_end_of_turn: bool = True
    stop_tokens: tuple[int, ...] = ()
    rewards: tuple[str, ...] = ("accept",)
    reward_weights: tuple[float, ...] = ()
    max_words: int = 3
    target_chars: int = 24
    loss_chunk: int = DEFAULT_LOSS_CHUNK
    seed: int = 0

    def __post_init__(self):
        def need(name, ok, fix):
            if not ok:
                raise ConfigError(f"objective.{name}: {getattr(self, name)!r} is out of range; {fix}.")

        need("group_size", self.group_size >= 1, "use at least one sample per prompt")
        need("clip_eps", self.clip_eps > 0, "use a positive clip range, e.g. 0.2")
        need("vf_coef", self.vf_coef >= 0, "use a non-negative value-loss weight, e.g. 0.1")
        need("vf_clip", self.vf_clip > 0, "use a positive value clip range, e.g. 0.2")
        need("kl_coef", self.kl_coef >= 0, "use 0 (no leash) or a positive weight, e.g. 0.05")
        need("gamma", 0 <= self.gamma <= 1, "use a discount in [0, 1], e.g. 1.0")
        need("lam", 0 <= self.lam <= 1, "use a GAE lambda in [0, 1], e.g. 0.95")
        need("ppo_epochs", self.ppo_epochs == 1,
             "several updates per rollout batch are not supported yet (the loop prepares a fresh batch "
             "every step); use 1")
        _check_rollout(self, need)


class PPO(GRPO):
    """PPO with a scalar value head on the policy's final hidden states (`objective.type: ppo`).

    It reuses GRPO's rollout and rewards (`GRPO.rollout`, `score`, the tokenizer and records);
    only the advantages and the loss differ. Per step:

    1. **Rollout + rewards**: as GRPO (`group_size` samples per prompt, scored on the host).
    2. **Rollout-time forward** (jitted, in `prepare`, current weights): the teacher-forced
       policy log-probs (they replace the sampler's, so the ratio and the KL compare one
       computation: exactly 1 and 0 at the first step), the values V_t (the head
       `params["heads"]["value"]`: a [D] kernel and a bias, zero at init) and, for the leash,
       the reference log-probs.
    3. **Per-token rewards**: the sequence reward on the last response token, minus
       `kl_coef` * (log pi - log pi_ref) on every response token (reward-shaping KL).
    4. **GAE** (`rl_losses.gae`, gamma, lam) -> per-token `advantages` (whitened over the
       batch's response tokens with `whiten_advantages`) and `returns`.
    5. **Loss** (in the step): the clipped ratio surrogate with per-token advantages plus
       `vf_coef` * the clipped value loss, token sums over `max_new_tokens` per row (GRPO's
       normaliser), weight = rows.

    The reference: with PEFT the base with adapters off (no copy). With full or partial
    fine-tuning the starting weights, which `prepare` needs (the step never reads them), so
    the objective loads them once itself, laid out by the policy's sharding rules, instead of
    passing an extra to the step that it would not use. They are not counted by `jaxlearn
    compile`'s extras report.

    Not yet: several epochs over one rollout batch (`ppo_epochs` > 1). The loop calls
    `prepare` on a fresh feed batch before every step (and for held-out batches), so reusing a
    prepared batch needs a loop change; `ppo_epochs` is checked to be 1.

    Batch (R = prompts * group_size rows, T = seq_len + max_new_tokens): GRPO's token features
    and `old_logprobs`, plus `old_values`, `token_rewards`, `advantages`, `returns` float32
    [R, T] and `rewards`, `kl` float32 [R] (the sequence reward; the rollout's per-sequence
    KL). Metrics (means over rows): `reward`, `kl`, `clip_frac`, `ratio`, `value_loss`,
    `explained_variance`, `response_len`, `entropy`. Example::

        objective: {type: ppo, kl_coef: 0.05, gamma: 1.0, lam: 0.95, vf_coef: 0.1}
        batch = objective.prepare(global_prompt_batch, state)   # rollout, values, GAE
    """

    Config = PPOConfig

    def __init__(self, model, cfg, run=None):
        super().__init__(model, cfg, run)
        # One jitted rollout-time forward per objective (compiles once per batch shape).
        self._rollout_forward = jax.jit(self._forward_terms)

    # ---- heads ------------------------------------------------------------------------------

    def init_heads(self, key):
        d = self.model.cfg.d_model
        # zero at init: V = 0 everywhere, so the first advantages are the (shaped) returns
        return {"value": {"kernel": jnp.zeros((d,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}

    def head_axes(self):
        return {"value": {"kernel": ("embed",), "bias": ()}}

    def values(self, params: dict, h_btd: jax.Array) -> jax.Array:
        """float32 [B, T] values of the hidden states: V_t estimates the return from the token
        that target t is (the state is the prefix through input t).

        >>> v = objective.values(params, hidden_states(model, params, batch))   # doctest: +SKIP
        """
        head = params["heads"]["value"]
        return h_btd.astype(jnp.float32) @ head["kernel"] + head["bias"]

    # ---- seams ------------------------------------------------------------------------------

    def extras(self):
        return {}  # the reference is read in `prepare` only (see the class docstring)

    def rollout_reference(self, params: dict) -> dict | None:
        """The reference policy's parameters for `prepare`, or None when no KL is needed."""
        if self.cfg.kl_coef == 0 and not self.cfg.report_kl:
            return None
        if self.run.peft.type != "none":
            from jaxlearn.peft.merge import without_adapters

            return without_adapters(params)
        if "reference" not in self._host:
            from jaxlearn.train.extras import build_extras

            self._host["reference"] = build_extras(self.reference_extras(), self.model.shard).values["reference"]
        return self._host["reference"]

    def _forward_terms(self, params, ref_params, batch):
        h = hidden_states(self.model, params, batch)
        lp = token_logprobs(self.model, params, batch, chunk=self.cfg.loss_chunk, hidden=h)
        ref_lp = None if ref_params is None else token_logprobs(self.model, ref_params, batch, chunk=self.cfg.loss_chunk)
        return lp, self.values(params, h), ref_lp

    def prepare(self, batch, state):
        from jaxlearn.objectives.reward import last_response_index

        cfg = self.cfg
        out, rewards = self.rollout(batch, state)
        mask = out["loss_mask"]
        lp, values, ref_lp = self._rollout_forward(state.params, self.rollout_reference(state.params), out)
        lp, values = lp * mask, values * mask
        kl_bt = jnp.zeros_like(lp) if ref_lp is None else (lp - ref_lp) * mask  # k1: its sum is the sequence KL
        last = last_response_index(mask)
        score_bt = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * rewards[:, None]
        token_rewards = score_bt - cfg.kl_coef * kl_bt
        adv, ret = L.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            n = jnp.maximum(jnp.sum(mask), 1.0)
            mean = jnp.sum(adv) / n
            std = jnp.sqrt(jnp.sum(jnp.square(adv - mean) * mask) / n)
            adv = (adv - mean) / (std + 1e-6) * mask
        out.update(old_logprobs=lp, old_values=values, token_rewards=token_rewards, advantages=adv, returns=ret,
                   rewards=rewards, kl=jnp.sum(kl_bt, axis=-1))
        return out

    def abstract_batch(self, batch_size, seq_len):
        r, t = batch_size * self.cfg.group_size, seq_len + self.cfg.max_new_tokens
        shapes = {k: ((r, t), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        shapes.update({k: ((r, t), jnp.float32) for k in ("loss_mask", "old_logprobs", "old_values", "token_rewards",
                                                          "advantages", "returns")})
        shapes.update(rewards=((r,), jnp.float32), kl=((r,), jnp.float32))
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}

    # ---- the loss ---------------------------------------------------------------------------

    def loss(self, params, batch, rng, extras):
        cfg = self.cfg
        mask = batch["loss_mask"].astype(jnp.float32)
        h = hidden_states(self.model, params, batch, rng)  # one trunk pass for the policy and the value head
        lp = token_logprobs(self.model, params, batch, rng, chunk=cfg.loss_chunk, hidden=h)
        values = self.values(params, h)
        pg, clipped, ratio = L.clipped_surrogate(lp, batch["old_logprobs"], batch["advantages"], mask, cfg.clip_eps)
        vl = L.clipped_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.vf_clip)
        rows = jnp.asarray(mask.shape[0], jnp.float32)
        n_b = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        per_row = lambda x: jnp.sum(jnp.sum(x, -1) / n_b)  # noqa: E731  (sum over rows of per-row token means)
        total = (jnp.sum(pg) + cfg.vf_coef * jnp.sum(vl)) / cfg.max_new_tokens
        metrics = {
            "reward": jnp.sum(batch["rewards"]),
            "kl": jnp.sum(batch["kl"]),
            "response_len": jnp.sum(mask),
            "clip_frac": per_row(clipped),
            "ratio": per_row(ratio * mask),
            "value_loss": per_row(vl),
            # a batch statistic: times rows, so the step's division by rows gives it back
            # (with gradient accumulation: the row-weighted mean over microbatches)
            "explained_variance": L.explained_variance(jax.lax.stop_gradient(values), batch["returns"], mask) * rows,
            "entropy": per_row(-batch["old_logprobs"] * mask),
        }
        return total, rows, metrics
