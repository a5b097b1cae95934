import platform
import shutil

import pytest
import torch

from dist_chita import nt_outer

X86 = platform.machine().lower() in ("x86_64", "amd64")


def reference(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(M K, B): row i K + j = sum_l a[i, l] * c[j, l], in float64."""
    return torch.einsum("ilb,jlb->ijb", a.double(), c.double()).reshape(a.shape[0] * c.shape[0], a.shape[2])


def test_builds_where_a_compiler_and_x86_are_present():
    # on the development machine and CI the kernel must really be in use, else the tests below only test torch
    if not X86 or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("needs x86 and a C compiler")
    assert nt_outer.available()


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("B", [1, 5, 16, 32, 37, 64])
@pytest.mark.parametrize("offset", [0, 3, 16])
def test_matches_einsum_in_columns_of_a_larger_array(L, B, offset):
    if not nt_outer.available():
        pytest.skip("kernel unavailable")
    g = torch.Generator().manual_seed(B * 10 + L + offset)
    M, K = 7, 11
    a, c = torch.randn(M, L, B, generator=g), torch.randn(K, L, B, generator=g)
    big = torch.full((M * K, B + 21), 7.5)  # row stride B + 21: rows start at every alignment
    out = big[:, offset : offset + B]
    assert nt_outer.outer_sum(a, c, out)
    torch.testing.assert_close(out.double(), reference(a, c), rtol=1e-6, atol=1e-6)
    if L == 1:  # one product per entry: bit for bit torch's
        assert torch.equal(out, (a[:, None, 0, :] * c[None, :, 0, :]).reshape(M * K, B))
    rest = torch.cat([big[:, :offset], big[:, offset + B :]], dim=1)
    assert (rest == 7.5).all()  # nothing written outside the columns


def test_threads_split_the_rows_the_same_way():
    if not nt_outer.available():
        pytest.skip("kernel unavailable")
    a, c = torch.randn(9, 2, 32), torch.randn(13, 2, 32)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty(9 * 13, 32)
            assert nt_outer.outer_sum(a, c, out)
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
    assert not nt_outer.outer_sum(a, c, out)
    assert (out == 0).all()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DIST_CHITA_NATIVE", "0")
    monkeypatch.setattr(nt_outer, "_lib", None)
    assert not nt_outer.available()
    assert not nt_outer.outer_sum(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.zeros(4, 4))


def test_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DIST_CHITA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nt_outer, "_lib", None)
    assert not nt_outer.available()
