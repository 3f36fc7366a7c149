"""Tiny random Hugging Face models that transformers builds and saves locally (no hub), and the
logits of both sides, for the import/export tests (tests/models/) and the PEFT export tests
(tests/peft/)."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import traverse_util

from helpers import logits_of
from jaxlearn.models.transformer import Transformer

TOKENS = np.random.RandomState(0).randint(0, 256, (3, 19))
TOL = 1e-4  # float32, tiny random models with logits up to ~8: measured max |diff| 1.2e-5 to 1.7e-5


def logits(cfg, params, tokens=TOKENS):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return np.asarray(logits_of(Transformer(cfg), params, jnp.asarray(tokens), pos, jnp.ones((b, t), jnp.int32)))


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def tree_equal(a, b) -> bool:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
        for k in fa)


def _save_hf_model(kind, path, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, initializer_range=0.2,
                rms_norm_eps=1e-6)
    base.update(kw)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    model = cls[1](cls[0](**base)).eval()
    if kind == "qwen2":  # random biases, so a bias that went missing would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.save_pretrained(path, max_shard_size="100KB")  # several shards + index file
    return model
