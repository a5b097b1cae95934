import torch

from dist_chita.report import gather_per_rank, layer_table, mask_digest, summary_lines
from tests import multiproc


def test_mask_digest_sees_every_bit_and_the_order():
    a = {"x": torch.tensor([True, False, True]), "y": torch.ones(2, 2, dtype=torch.bool)}
    d = mask_digest(a, ["x", "y"])
    assert d == mask_digest({k: v.clone() for k, v in a.items()}, ["x", "y"])
    b = {"x": torch.tensor([True, True, True]), "y": a["y"]}
    assert mask_digest(b, ["x", "y"]) != d
    assert mask_digest(a, ["y", "x"]) != d


def test_layer_table_counts():
    rows = layer_table({"w": torch.tensor([[True, False], [False, False]])}, ["w"])
    assert rows == [{"name": "w", "shape": [2, 2], "size": 4, "kept": 1, "sparsity": 0.75}]


def _gather():
    from dist_chita.distributed import comm

    return gather_per_rank({"t": float(comm.rank()), "only0": 1} if comm.rank() == 0 else {"t": 5.0})


def test_gather_per_rank_on_two_processes():
    out = multiproc.run(_gather, 2)
    assert out[0] == out[1] == {"only0": [1, 0], "t": [0.0, 5.0]}


def test_summary_mentions_the_essentials():
    report = {
        "method": "chita",
        "world_size": 2,
        "n": 10,
        "global": {"p": 100, "kept": 10, "sparsity": 0.9},
        "metric": {"name": "accuracy", "before": 0.9, "after": 0.8},
        "stages": [{"sparsity": 0.9, "objective": 1.5, "magnitude_objective": 2.0, "iterations": 3}],
        "phase_seconds": {"fisher": [1.0, 2.0]},
        "peak_memory_bytes": [2**30, 2**31],
    }
    text = "\n".join(summary_lines(report))
    assert "sparsity 0.9000" in text and "after 0.8000" in text and "fisher 2.00" in text and "2.00 GiB" in text
    assert "objective 1.5 (magnitude+backsolve 2, 25.00% lower)" in text  # the solver's gain over its warm start
