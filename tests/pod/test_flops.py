"""XLA's FLOPs of a training step against the count of what the program should execute.

`flop_count` compiles the step with 1 and 2 unrolled layers and extrapolates to all layers;
`expected_flops_per_token` is the analytic count of the same program (6N, remat recompute,
attention as compiled). XLA's cost analysis counts a loop body once, so a loop left in the FLOP
programs hides FLOPs. The model here is tiny, but with 1,024 tokens on each of 8 v5p chips the
TPU partitioner already turns its FSDP matmuls into windowed einsum loops, as it does for
Llama-3-8B on 32 chips: with the windowing on, XLA's count falls well short (8B: 0.52x of
6N + attention). Each compile takes ~5 s of CPU.
"""

import pytest

from jaxlearn.config import Config, DataConfig, MeshConfig, ModelConfig
from jaxlearn.objectives.lm import LMConfig
from jaxlearn.pod.compile import (
    expected_flops_per_token,
    flop_count,
    lower_step,
    program_facts,
)

TOPOLOGY = "v5p:2x2x2"  # 8 chips, FSDP over all


@pytest.fixture(autouse=True)
def _own_compiles(fresh_compile):
    with fresh_compile():
        yield


def _cfg(remat: str, n_layers: int = 4, scan: bool = True, loss_chunk: int = 256) -> Config:
    # head_dim 128 as in real models: the attention's elementwise work (softmax, masks) is then
    # a few % of its matmuls, not a quarter as with head_dim 32
    model = ModelConfig(vocab_size=2048, d_model=128, n_layers=n_layers, n_heads=1, n_kv_heads=1, d_ff=512,
                        max_seq_len=128, compute_dtype="bfloat16", remat=remat, scan_layers=scan)
    return Config(model=model, data=DataConfig(seq_len=128, batch_size=64), mesh=MeshConfig(preset="fsdp"),
                  objective=LMConfig(loss_chunk=loss_chunk))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_xla_flops_match_the_expected_count(remat):
    f = flop_count(_cfg(remat), TOPOLOGY)
    # no loop left whose body XLA would count once (windowed einsums; the LM head's 256-token
    # chunks, made one chunk); attention in the splash kernels
    assert f.program["loops"] == 0 and f.program["attention"] == ["splash"], f.program
    # XLA's own part: the expected count less the kernels' analytic attention, which XLA counts
    # as 0. Measured: 1.024 for both (norms, softmax statistics, optimizer: elementwise work).
    # With the windowed einsum loops it would be 0.85; with remat=full modelled as 8N/6N (down
    # and the LM head recomputed too) 0.92.
    assert f.xla / (f.expected - f.kernel) == pytest.approx(1.0, abs=0.05), (f.xla, f.expected, f.kernel)
    assert f.kernel > 0 and f.notes[0].startswith("attention runs in Pallas kernels (splash)")
    if remat == "full":
        assert any("not 8/6 = 1.33" in n for n in f.notes)


def test_the_default_compile_windows_the_matmuls_and_undercounts():
    """The reason for FLOP_COMPILE_OPTIONS: the program as the TPU runs it holds windowed einsum
    loops, and XLA's count of it is short of what the same program executes."""
    cfg = _cfg("none", n_layers=2, scan=False, loss_chunk=0)  # no LM-head chunk loop: only the windowing
    step = lower_step(cfg, TOPOLOGY)
    compiled = step.lowered.compile()
    facts = program_facts(compiled.as_text())
    assert facts["windowed_einsum_loops"] > 0 and facts["loops"] == facts["windowed_einsum_loops"]
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] * step.n_devices
    parts = expected_flops_per_token(cfg, "splash")
    visible = (parts["total"] - parts["kernel"]) * cfg.data.batch_size * cfg.data.seq_len
    assert xla < 0.9 * visible, xla / visible
