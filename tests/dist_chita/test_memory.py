import torch

from dist_chita.memory import advice, estimate, peak_bytes


def test_factor_term_is_n_times_block_times_dtype():
    e = estimate(
        p=1000, n=64, world_size=3, storage_dtype="bfloat16", model_params=2000, largest_layer=500, micro_batch=8
    )
    assert e.factor == 64 * 334 * 2
    assert e.model == 8000
    assert e.total == e.factor + e.model + e.gradient_buffer + e.solver + e.backsolve
    sharded = estimate(1000, 64, 4, "float32", 2000, 500, 8, model_sharded=True)
    assert sharded.model == 2000


def test_resnet50_scale_estimate_is_about_6_gb():
    e = estimate(
        p=23_454_912,
        n=64,
        world_size=1,
        storage_dtype="float32",
        model_params=25_557_032,
        largest_layer=2_359_296,
        micro_batch=8,
    )
    assert 6.0e9 < e.factor < 6.1e9


def test_peak_grows_with_an_allocation():
    before = peak_bytes(torch.device("cpu"))
    x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    after = peak_bytes(torch.device("cpu"))
    assert after >= before and after > 0 and x.sum() > 0


def test_advice_names_remedies():
    e = estimate(10**9, 128, 2, "float32", 10**9, 10**7, 8)
    msg = advice(e, 10**9, 128, 2, "float32")
    assert "bfloat16" in msg and "n = 128" in msg and "more ranks" in msg and "\n" not in msg
