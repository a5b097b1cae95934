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
