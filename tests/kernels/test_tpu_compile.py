"""Each TPU (Mosaic) kernel lowers and compiles ahead of time for real TPU topologies (v5e and
v5p, described by libtpu on this CPU machine; no TPU needed): the fused LoRA forward and dx
kernels for dense, int8 and NF4 bases, f32 and bf16, ragged sizes, and the multi-adapter
variant, each inside jit(grad(...)) so the backward compiles too. The default suite compiles
every kernel for v5e in bf16; f32 and v5p are `slow`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlearn.kernels.lora import lora_matmul
from jaxlearn.kernels.multi_lora import multi_lora_matmul
from jaxlearn.kernels.quant import quantize

# libtpu takes a machine-wide lock when it loads; other test processes on a shared machine may
# hold it, and compile-only use needs no exclusive TPU access.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(autouse=True)
def _own_compiles(fresh_compile):  # the checks read the compiled HLO
    with fresh_compile():
        yield


def _tpu_sharding(topology):
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract(tree, sharding):
    return jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype, sharding=sharding), tree)


def _base(fmt, d_in, d_out, dtype):
    w = jax.ShapeDtypeStruct((d_in, d_out), dtype)
    return w if fmt == "dense" else jax.eval_shape(lambda w: quantize(w, fmt), w)


def _compile_grad(loss, args, sharding):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3))).lower(*_abstract(args, sharding)).compile()
    hlo = compiled.as_text()
    # the Mosaic kernels are in the executable (not an XLA fallback): forward and dx
    assert hlo.count("tpu_custom_call") >= 2, "expected the fused forward and dx Mosaic kernels"
    return compiled


# The default suite compiles each base format once for v5e (bf16, as trained); f32 and the second
# topology (v5p) are a sweep of the same kernels: `slow`.
SWEEP = pytest.mark.slow
CASES = [pytest.param(topology, fmt, dtype, marks=() if topology == "v5e:2x2" and dtype == jnp.bfloat16 else SWEEP,
                      id=f"{fmt}-{jnp.dtype(dtype).name}-{topology}")
         for topology in ("v5e:2x2", "v5p:2x2x1")
         for fmt, dtype in [("dense", jnp.bfloat16), ("dense", jnp.float32), ("int8", jnp.bfloat16), ("nf4", jnp.bfloat16)]]


@pytest.mark.parametrize("topology,fmt,dtype", CASES)
def test_lora_kernels_compile_for_tpu(topology, fmt, dtype):
    sharding = _tpu_sharding(topology)
    t, d_in, d_out, r = 520, 1000, 776, 16  # ragged: none is a multiple of the blocks

    def loss(x, w, a, b):
        return jnp.sum(lora_matmul(x, w, a, b, 2.0, impl="tpu").astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((t, d_in), dtype), _base(fmt, d_in, d_out, dtype),
            jax.ShapeDtypeStruct((d_in, r), dtype), jax.ShapeDtypeStruct((r, d_out), dtype))
    _compile_grad(loss, args, sharding)


def test_multi_adapter_kernel_compiles_for_tpu():
    sharding = _tpu_sharding("v5e:2x2")
    b, s, d_in, d_out, r, n = 4, 200, 512, 384, 8, 3
    dt = jnp.bfloat16

    def loss(x, w, a, bb):
        ids = jnp.arange(b, dtype=jnp.int32) % n
        return jnp.sum(multi_lora_matmul(x, w, a, bb, jnp.ones((n,)), ids, impl="tpu").astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((b, s, d_in), dt), jax.ShapeDtypeStruct((d_in, d_out), dt),
            jax.ShapeDtypeStruct((n, d_in, r), dt), jax.ShapeDtypeStruct((n, r, d_out), dt))
    _compile_grad(loss, args, sharding)
