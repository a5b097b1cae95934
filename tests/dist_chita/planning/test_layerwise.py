"""The layerwise cost model against the library (a tiny Llama built from a config) and against arithmetic done here."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dist_chita.layerwise import curvature, driver
from dist_chita.planning import layerwise as lw
from dist_chita.planning.costmodel import Hardware
from dist_chita.planning.memory import estimate_run
from dist_chita.prunable import prunable_modules

transformers = pytest.importorskip("transformers")

SHAPE = lw.TransformerShape(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=100)
HW = Hardware(name="test", memory_bytes=1e9, memory_bandwidth=1e10, flops=1e11, link_bandwidth=1e9,
              link_latency=1e-5, flops_float32=5e10, flops_float64=2e10)


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=SHAPE.hidden, intermediate_size=SHAPE.intermediate,
                                   num_hidden_layers=SHAPE.layers, num_attention_heads=SHAPE.heads,
                                   num_key_value_heads=SHAPE.kv_heads, vocab_size=SHAPE.vocab)
    torch.manual_seed(0)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


def test_shape_matches_the_model_and_its_config():
    cfg, model = _tiny_llama()
    assert lw.TransformerShape.from_hf_config(cfg.to_dict()) == SHAPE
    assert SHAPE.params == sum(p.numel() for p in model.parameters())
    modules = prunable_modules(model)
    assert [tuple(m.weight.shape) for _, m in modules] == SHAPE.block_dims() * SHAPE.layers
    assert [n.rsplit(".", 1)[1] for n, _ in modules] == list(lw.LAYER_NAMES) * SHAPE.layers
    assert curvature.blocks_in_order(modules) == [list(range(b * 7, b * 7 + 7)) for b in range(SHAPE.layers)]


@pytest.mark.parametrize("method", ["chita", "sparsegpt"])
def test_curvature_and_solver_memory_are_the_drivers(method):
    _, model = _tiny_llama()
    parts = lw.memory_parts(SHAPE, lw.Job(n=8, tokens=16, ranks=1, method=method))
    assert parts["curvature"] + parts["solver"] == driver.memory_bytes(prunable_modules(model), method)


def test_memory_within_factor_of_the_librarys_estimate():
    """The library's estimate of the same run (api's call of estimate_run, the cached block measured on a real
    forward): the plan's parts besides the activations (measured by the library at run time, not from the shape)
    agree within 1.1x: only the cached input differs (the plan counts hidden states and rotary cos / sin; the
    measured call also holds position ids, one int64 per token, under a tenth of the rest at d >= 64)."""
    _, model = _tiny_llama()
    modules = prunable_modules(model)
    n, T, B = 8, 16, 2
    batch = {"input_ids": torch.randint(0, SHAPE.vocab, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long)}
    measured_call = curvature.block_call_bytes(model, modules, lambda b: model(**b), batch)
    job = lw.Job(n=n, tokens=T, ranks=2, micro_batch=B, model_bytes=4, act_bytes=4)
    call = T * (B * SHAPE.hidden + 2 * SHAPE.head_dim) * 4
    assert call <= measured_call <= 1.1 * call
    sizes = [m.weight.numel() for _, m in modules]
    lib = estimate_run(objective="layerwise", p=sum(sizes), n=n, world_size=2, sizes=sizes,
                       model_params=SHAPE.params, micro_batch=B, layerwise_solver=driver.memory_bytes(modules),
                       cached_block_bytes=measured_call)
    plan = lw.memory_parts(SHAPE, job)
    assert plan["model"] == lib.model
    ours = plan["total"] - plan["activations"]
    assert lib.total / 1.1 <= ours <= lib.total * 1.1


def test_zero3_memory_shards_the_model_and_drops_the_cache():
    job = lw.Job(n=64, tokens=32, ranks=4)
    plain, z3 = lw.memory_parts(SHAPE, job), lw.memory_parts(SHAPE, replace(job, zero3=True))
    assert z3["model"] == SHAPE.params * 2 // 4 and plain["model"] == SHAPE.params * 2
    assert z3["gathered"] == SHAPE.params * 2 and plain["gathered"] == 0  # smaller than DeepSpeed's prefetch: all
    seven = lw.PRESETS["llama-7b"]  # a block (202 M) is larger than the head (131 M), plus 5e7 prefetched
    assert lw.memory_parts(seven, replace(job, zero3=True))["gathered"] == (seven.block_params + 50_000_000) * 2
    assert z3["cached_inputs"] == 0 and plain["cached_inputs"] == 2 * 16 * 32 * (64 + 2 * 16) * 2


def test_chita_solve_time_is_the_counted_products():
    """One layer by hand: rows of the busiest rank x (24 + 12 s) products of 2 d^2 FLOPs at F32 (10 conjugate-gradient
    products, the new gradient, 4 moves of a quarter product each), plus the per-layer set-up (2 d^3 / 3 at F64,
    768 d^2 at F32); with one trial 15 products a step (its objective's 2 and the back-solve's starting gradient) and
    the Lipschitz constant's 100 d^2 at F64."""
    r, d = 200, 1024  # 4 chunks of 64, 64, 64, 8 rows (chunk_rows(1024) = 64)
    for trials, per_step, lipschitz in ((0, 12, 0), (1, 15, 100 * d * d)):
        rates = lw.LayerwiseRates(steps=7, trials=trials)
        setup = (2 * d**3 / 3 + lipschitz) / 2e10 + 768 * d * d / 5e10
        for ranks, rows in ((1, 200), (2, 128), (4, 64), (8, 64)):
            want = rows * (24 + per_step * 7) * 2 * d * d / 5e10 + setup
            assert lw.chita_layer_seconds(r, d, ranks, HW, rates) == pytest.approx(want, rel=1e-12)


def test_sparsegpt_solve_takes_the_busiest_ranks_layers():
    one = [lw.sparsegpt_layer_seconds(r, d, HW, lw.LayerwiseRates()) for r, d in SHAPE.block_dims()]
    assert one[0] == pytest.approx((4 * 64**3 / 3 + 64 * 64**2 + 64 * 64 * 128) / 2e10)
    job = lw.Job(n=8, tokens=16, ranks=1, method="sparsegpt")
    assert lw.solver_seconds(SHAPE, job, HW, lw.LayerwiseRates()) == pytest.approx(2 * sum(one))
    many = lw.solver_seconds(SHAPE, replace(job, ranks=7), HW, lw.LayerwiseRates())
    assert many == pytest.approx(2 * max(one))  # 7 ranks: one layer each


def test_curvature_forwards_scale_with_ranks_and_zero3():
    job = lw.Job(n=64, tokens=32, ranks=1)
    per_token = 2 * SHAPE.block_params + 4 * 32 * 64
    base = lw.curvature_seconds(SHAPE, job, HW)
    assert base["forward"] == pytest.approx(3 * 64 * 32 * per_token / 1e11)  # 2 L - 1 = 3 block forwards
    assert base["products"] == pytest.approx(2 * 64 * 32 * (3 * 64**2 + 96**2) / 5e10)
    four = lw.curvature_seconds(SHAPE, replace(job, ranks=4), HW)
    assert four["forward"] == pytest.approx(base["forward"] / 4)
    z3 = lw.curvature_seconds(SHAPE, replace(job, ranks=4, zero3=True), HW)
    # under ZeRO-3 each of the L = 2 passes runs the whole model, 2 blocks and the head (2 d V per token), on the
    # rank's 16 windows of 32 tokens
    assert z3["forward"] == pytest.approx(2 * 16 * 32 * (2 * per_token + 2 * 64 * 100) / 1e11)
    deep = replace(SHAPE, layers=8)
    head = 2 * 64 * 100
    assert (lw.curvature_seconds(deep, replace(job, zero3=True), HW)["forward"]
            / lw.curvature_seconds(deep, job, HW)["forward"]) == pytest.approx(8 * (8 * per_token + head)
                                                                            / (15 * per_token))
    # every pass gathers all P parameters once per micro-batch (16 of one window), with 2 latencies (log2 4) for
    # each of the 9 L + 3 = 21 parameter tensors
    assert z3["gather"] == pytest.approx(2 * 16 * (0.75 * SHAPE.params * 2 / 1e9 + 21 * 2 * 1e-5))
    assert four["allreduce"] == pytest.approx(2 * (1.5 * 8 * (3 * 64**2 + 96**2) / 1e9 + 4 * 1e-5))


def test_smallest_fitting_is_the_first_count_that_fits():
    job = lw.Job(n=128, tokens=2048, ranks=1, zero3=True)
    shape = lw.PRESETS["llama-70b"]
    hw = replace(HW, memory_bytes=80e9)
    r = lw.smallest_fitting(shape, job, hw)
    assert r is not None and r > 1
    assert lw.memory_parts(shape, replace(job, ranks=r))["total"] <= 72e9  # a tenth of the device kept free
    assert lw.memory_parts(shape, replace(job, ranks=r - 1))["total"] > 72e9
    assert lw.smallest_fitting(shape, replace(job, zero3=False), hw) is None  # 138 GB of bfloat16 weights per rank


def test_bad_shapes_and_jobs_are_refused():
    with pytest.raises(ValueError, match="heads"):
        lw.TransformerShape(layers=1, hidden=60, intermediate=8, heads=7, kv_heads=7, vocab=10)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        lw.TransformerShape.from_hf_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="method"):
        lw.Job(n=1, tokens=1, ranks=1, method="wanda")
    assert math.isfinite(lw.phase_seconds(SHAPE, lw.Job(n=1, tokens=1, ranks=3), HW)["total"])


def test_counted_products_follow_the_row_solvers_defaults():
    """The plan counts the row solver as it runs by default: its back-solve iterations and support-changing trials."""
    import inspect

    from dist_chita.layerwise.row_solver import solve_rows

    defaults = {k: p.default for k, p in inspect.signature(solve_rows).parameters.items()}
    rates = lw.LayerwiseRates()
    assert (rates.refit_iters, rates.trials, rates.moves) == (defaults["refit_iters"], defaults["trials"],
                                                              defaults["moves"])


def test_zero3_writeback_counts_the_gathers_and_broadcasts():
    shape = lw.TransformerShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=100)
    job = lw.Job(n=8, tokens=16, ranks=4, model_bytes=2, zero3=True)
    plain = lw.writeback_seconds(shape, replace(job, zero3=False), HW)
    weights = 2 * (4 * 64 * 64 + 3 * 128 * 64)  # q, k, v, o; gate, up, down per block
    # gather: (R - 1) / R of each weight received; broadcast: the whole weight; 2 bytes each, at 1e9 B/s; 14
    # layers x (1 + ceil(log2 4)) latencies of 1e-5 s
    by_hand = (3 / 4 + 1) * weights * 2 / 1e9 + 14 * 3 * 1e-5
    assert lw.writeback_seconds(shape, job, HW) - plain == pytest.approx(by_hand)
    half = replace(HW, zero3_gather_efficiency=0.5)
    assert lw.writeback_seconds(shape, job, half) - plain == pytest.approx(2 * (by_hand - 14 * 3e-5) + 14 * 3e-5)
    assert lw.zero3_write_seconds(shape, replace(job, ranks=1), HW) == 0.0  # nothing to gather
    # the efficiency a measurement gives is the one that reproduces it
    measured = lw.writeback_seconds(shape, job, replace(HW, zero3_gather_efficiency=0.3))
    assert lw.zero3_gather_efficiency(measured, shape, job, HW) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no longer than the plan"):
        lw.zero3_gather_efficiency(plain, shape, job, HW)
    with pytest.raises(ValueError, match="zero3_gather_efficiency must be in"):
        replace(HW, zero3_gather_efficiency=0.0)
