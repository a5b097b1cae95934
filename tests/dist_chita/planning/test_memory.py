import torch

from dist_chita.planning.memory import advice, estimate, peak_bytes, peak_growth


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


def test_peak_growth_measures_a_temporary_below_an_earlier_peak():
    """A 64 MiB temporary is measured as such although the process peaked higher before (a freed 256 MiB), and
    the process's peak is still reported."""
    cpu = torch.device("cpu")
    big = torch.ones(256 * 2**20 // 4)
    high = peak_bytes(cpu)
    assert big.sum() > 0
    del big

    def temporary():
        x = torch.ones(64 * 2**20 // 4)  # touched
        return float(x.sum())

    grown = peak_growth(temporary, cpu)
    assert 60 * 2**20 < grown < 80 * 2**20
    assert peak_bytes(cpu) >= high - 2**20  # the kernel's resident counts lag by a few pages
    assert peak_growth(lambda: None, cpu) < 8 * 2**20


def test_advice_names_remedies():
    e = estimate(10**9, 128, 2, "float32", 10**9, 10**7, 8)
    msg = advice(e, 10**9, 128, 2, "float32")
    assert "bfloat16" in msg and "n = 128" in msg and "more ranks" in msg and "\n" not in msg


def test_backsolve_term_counts_gram_and_gathered_rows():
    """G and its factor (2 x 8 n^2) plus the kept rows gathered in float32 + float64 (12 bytes per entry, at most
    |S_r| <= p_r rows, and never more than the 384 MiB the backsolve allows itself)."""
    small = estimate(p=1000, n=64, world_size=2, storage_dtype="float32", model_params=1000, largest_layer=500,
                     micro_batch=8)
    assert small.backsolve == 2 * 8 * 64 * 64 + 12 * 500 * 64
    big = estimate(p=10**8, n=1000, world_size=2, storage_dtype="float32", model_params=10**8, largest_layer=10**7,
                   micro_batch=8)
    assert big.backsolve == 2 * 8 * 1000 * 1000 + 384 * 2**20
