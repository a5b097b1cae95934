import os
import platform
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist_chita.fisher import ntstore
from tests.multiproc import run

X86 = platform.machine().lower() in ("x86_64", "amd64")


def reference(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(M K, B): row i K + j = sum_l a[i, l] * c[j, l], in float64."""
    return torch.einsum("ilb,jlb->ijb", a.double(), c.double()).reshape(a.shape[0] * c.shape[0], a.shape[2])


@pytest.fixture(params=["native", "avx2"])
def variant(request, monkeypatch):
    """The kernels as built for this CPU, and as built for an AVX2-only one (-march=haswell: the other branch of
    the C source, which this AVX-512 machine would otherwise never run)."""
    if not ntstore.available():
        pytest.skip("kernel unavailable")
    if request.param == "avx2":
        lib = ntstore._build("haswell")
        if lib is False:
            pytest.skip("the compiler cannot target haswell")
        monkeypatch.setattr(ntstore, "_lib", lib)
    return request.param


def test_builds_where_a_compiler_and_x86_are_present():
    # on the development machine and CI the kernel must really be in use, else the tests below only test torch
    if not X86 or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("needs x86 and a C compiler")
    assert ntstore.available()


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("B", [1, 5, 16, 32, 37, 64])
@pytest.mark.parametrize("offset", [0, 3, 16])
def test_matches_einsum_in_columns_of_a_larger_array(L, B, offset, variant):
    g = torch.Generator().manual_seed(B * 10 + L + offset)
    M, K = 7, 11
    a, c = torch.randn(M, L, B, generator=g), torch.randn(K, L, B, generator=g)
    big = torch.full((M * K, B + 21), 7.5)  # row stride B + 21: rows start at every alignment
    out = big[:, offset : offset + B]
    assert ntstore.outer_sum(a, c, out)
    torch.testing.assert_close(out.double(), reference(a, c), rtol=1e-6, atol=1e-6)
    if L == 1:  # one product per entry: bit for bit torch's
        assert torch.equal(out, (a[:, None, 0, :] * c[None, :, 0, :]).reshape(M * K, B))
    rest = torch.cat([big[:, :offset], big[:, offset + B :]], dim=1)
    assert (rest == 7.5).all()  # nothing written outside the columns


def test_threads_split_the_rows_the_same_way():
    if not ntstore.available():
        pytest.skip("kernel unavailable")
    a, c = torch.randn(9, 2, 32), torch.randn(13, 2, 32)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty(9 * 13, 32)
            assert ntstore.outer_sum(a, c, out)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16 out", "strided a", "strided columns", "shape"],
)
def test_declines_what_it_does_not_handle_and_writes_nothing(case):
    a, c, out = torch.randn(3, 1, 8), torch.randn(4, 1, 8), torch.zeros(12, 8)
    if case == "float64":
        a, c, out = a.double(), c.double(), out.double()
    elif case == "bfloat16 out":
        out = out.bfloat16()
    elif case == "strided a":
        a = torch.randn(3, 1, 16)[:, :, ::2]
    elif case == "strided columns":
        out = torch.zeros(12, 16)[:, ::2]
    else:
        out = torch.zeros(12, 9)
    assert not ntstore.outer_sum(a, c, out)
    assert (out == 0).all()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DIST_CHITA_NATIVE", "0")
    monkeypatch.setattr(ntstore, "_lib", None)
    assert not ntstore.available()
    assert not ntstore.outer_sum(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.zeros(4, 4))


def test_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DIST_CHITA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ntstore, "_lib", None)
    assert not ntstore.available()


@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("R", [1, 5, 16, 33])
@pytest.mark.parametrize("C", [1, 7, 16, 21, 64])
def test_copy_into_columns_of_a_larger_array(layout, R, C, variant):
    """dst = src into a column block of a wider array (rows at every alignment), from contiguous rows or from
    a transposed (C, R) array (the column exchange's two cases): equal to torch's copy, nothing else written."""
    g = torch.Generator().manual_seed(R * 100 + C)
    src = torch.randn(R, C, generator=g) if layout == "rows" else torch.randn(C, R, generator=g).t()
    for offset in (0, 3, 16):
        big = torch.full((R, C + 37), 7.5)
        dst = big[:, offset : offset + C]
        assert ntstore.copy_into(dst, src)
        assert torch.equal(dst, src)
        rest = torch.cat([big[:, :offset], big[:, offset + C :]], dim=1)
        assert (rest == 7.5).all()


@pytest.mark.parametrize(
    "case", ["bfloat16 dst", "float64", "strided both ways", "strided dst columns", "shape", "empty"]
)
def test_copy_into_declines_what_it_does_not_handle(case):
    dst, src = torch.zeros(6, 8), torch.randn(6, 8)
    if case == "bfloat16 dst":
        dst = dst.bfloat16()
    elif case == "float64":
        dst, src = dst.double(), src.double()
    elif case == "strided both ways":
        src = torch.randn(12, 16)[::2, ::2]
    elif case == "strided dst columns":
        dst = torch.zeros(6, 16)[:, ::2]
    elif case == "shape":
        src = torch.randn(6, 7)
    else:
        dst, src = torch.zeros(0, 8), torch.randn(0, 8)
    assert not ntstore.copy_into(dst, src)
    assert (dst == 0).all()


def test_copy_into_threads_split_the_rows():
    if not ntstore.available():
        pytest.skip("kernel unavailable")
    src = torch.randn(40, 100).t()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dst = torch.zeros(100, 50)[:, 5:45]
            assert ntstore.copy_into(dst, src)
            outs.append(dst.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], src) and torch.equal(outs[1], src)


def threaded_copy():
    torch.set_num_threads(2)
    src = torch.randn(30, 20)
    dst = torch.zeros(30, 20)
    assert ntstore.copy_into(dst, src)
    return torch.equal(dst, src)


def test_threads_in_a_forked_process(monkeypatch):
    """A process forked after the thread pool was made (the tests' ranks are) gets its own pool: the parent's
    has no threads there, and jobs queued on it would never run."""
    if not ntstore.available():
        pytest.skip("kernel unavailable")
    pool = ThreadPoolExecutor(2)
    both = threading.Barrier(2)
    for job in [pool.submit(both.wait) for _ in range(2)]:  # both worker threads started, then idle
        job.result()
    time.sleep(0.1)
    monkeypatch.setattr(ntstore, "_pool", pool)
    monkeypatch.setattr(ntstore, "_pool_pid", os.getpid())
    assert run(threaded_copy, 1, timeout=20) == [True]
    pool.shutdown()
