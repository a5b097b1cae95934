import os
import pickle

import pytest
import torch

from dist_chita.distributed import comm
from tests.multiproc import run


def exchange(world, rows_to):
    """Rank r sends rows_to[r][q] rows to rank q; row values encode (sender, receiver, position)."""
    r = comm.rank()
    send = torch.cat(
        [
            torch.full((c, 2), 0.0)
            + torch.tensor([100.0 * r + q, 0.0])
            + torch.arange(c)[:, None] * torch.tensor([0.0, 1.0])
            for q, c in enumerate(rows_to[r])
        ]
    )
    recv_counts = [rows_to[q][r] for q in range(world)]
    fresh = comm.all_to_all(send, rows_to[r], recv_counts)
    out = torch.full((sum(recv_counts), 2), float("nan"))
    reused = comm.all_to_all(send, rows_to[r], recv_counts, out=out)
    errors = []
    for bad in (
        torch.empty(sum(recv_counts) + 1, 2),
        torch.empty(sum(recv_counts), 2, dtype=torch.float64),
        torch.empty(sum(recv_counts), 4)[:, ::2],
    ):
        try:
            comm.all_to_all(send, rows_to[r], recv_counts, out=bad)
        except ValueError as exc:
            errors.append(str(exc))
    return fresh, reused, reused.data_ptr() == out.data_ptr(), errors


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_uneven_splits_into_a_given_buffer(world):
    rows_to = [[(r + 2 * q) % 4 for q in range(world)] for r in range(world)]  # includes empty sends
    for r, (fresh, reused, same, errors) in enumerate(run(exchange, world, world, rows_to)):
        truth = torch.cat(
            [
                torch.stack([torch.full((rows_to[q][r],), 100.0 * q + r), torch.arange(rows_to[q][r]).float()], 1)
                for q in range(world)
            ]
        )
        assert torch.equal(fresh, truth) and torch.equal(reused, truth) and same
        assert len(errors) == 3 and all("all_to_all out must be" in e for e in errors)


def test_world_size_one_is_the_identity():
    send = torch.arange(6.0)
    assert comm.all_to_all(send, [6], [6]) is send
    t = torch.ones(3)
    assert comm.all_reduce(t, "max") is t and torch.equal(t, torch.ones(3))
    assert comm.all_gather(t)[0] is t and comm.world_size() == 1 and comm.rank() == 0 and comm.is_main()
    with pytest.raises(ValueError, match="unknown reduce op"):
        comm.all_reduce(t, "mean")


def collectives(world):
    """Every collective of comm on values that identify the rank, with the bytes each phase counted."""
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    comm.reset_stats()
    r = comm.rank()
    out = {"world": comm.world_size(), "local": comm.local_world_size(), "main": comm.is_main()}
    with comm.phase("reduce"):
        for op in ("sum", "max", "min"):
            out[op] = comm.all_reduce(torch.tensor([float(r + 1), float(-r), 10.0 * r]), op).clone()  # 3 x float32
        out["floats"] = comm.all_reduce_floats([r + 0.5, 2.0**r], "sum")  # 2 x float64
        out["floats_max"] = comm.all_reduce_floats([r + 0.5], "max")
    with comm.phase("gather"):
        out["gather"] = comm.all_gather(torch.tensor([r, 7 * r], dtype=torch.int32))  # 2 x int32
        out["gather_obj"] = comm.all_gather_object(("rank", r))
    with comm.phase("bcast"):
        src = world - 1
        out["bcast"] = comm.broadcast(torch.full((4,), float(r), dtype=torch.float64), src=src)  # 4 x float64 on src
        out["bcast_obj"] = comm.broadcast_object({"from": r}, src=src)
    out["bytes"], out["calls"] = comm.bytes_by_phase(), comm.calls_by_phase()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_collective_and_its_byte_count_against_hand_computed_values(world):
    """At world size R each collective gives, on every rank, the value computed by hand from the rank-encoded
    inputs (sum / max / min over ranks, the gathered list in rank order, the broadcast from a non-zero src); the
    local world size defaults to R when the launcher does not set it; and each phase counts the payload bytes
    numel x element_size that this rank contributes (the broadcast only on its source)."""
    ranks = range(world)
    for r, out in enumerate(run(collectives, world, world)):
        assert out["world"] == world and out["local"] == world and out["main"] == (r == 0)
        assert out["sum"].tolist() == [sum(q + 1.0 for q in ranks), -sum(ranks), 10.0 * sum(ranks)]
        assert out["max"].tolist() == [float(world), 0.0, 10.0 * (world - 1)]
        assert out["min"].tolist() == [1.0, -(world - 1.0), 0.0]
        assert out["floats"] == [sum(q + 0.5 for q in ranks), sum(2.0**q for q in ranks)]
        assert out["floats_max"] == [world - 0.5]
        assert [g.tolist() for g in out["gather"]] == [[q, 7 * q] for q in ranks]
        assert out["gather_obj"] == [("rank", q) for q in ranks]
        assert out["bcast"].tolist() == [float(world - 1)] * 4
        assert out["bcast_obj"] == {"from": world - 1}
        src = r == world - 1
        assert out["bytes"]["reduce"] == 3 * 3 * 4 + 2 * 8 + 1 * 8
        assert out["calls"]["reduce"] == 5
        assert out["bytes"]["gather"] == 2 * 4 + len(pickle.dumps(("rank", r)))
        assert out["calls"]["gather"] == 2
        assert out["bytes"].get("bcast", 0) == (4 * 8 + len(pickle.dumps({"from": r})) if src else 0)
        assert out["calls"].get("bcast", 0) == (2 if src else 0)
