import pytest

from dist_chita.distributed.partition import column_blocks, even_counts, row_blocks, sample_ranges


@pytest.mark.parametrize("total,parts", [(0, 1), (7, 3), (10, 4), (3, 4), (1_000_003, 4)])
def test_even_counts(total, parts):
    c = even_counts(total, parts)
    assert sum(c) == total and len(c) == parts and max(c) - min(c) <= 1
    assert c == sorted(c, reverse=True)


def test_sample_ranges_cover_all_and_reject_too_few():
    assert sample_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="smaller than the number of ranks"):
        sample_ranges(3, 4)


@pytest.mark.parametrize("p,world,align", [(1003, 3, 1), (1000, 4, 4), (8, 4, 4), (24, 5, 4)])
def test_column_blocks_contiguous_balanced_aligned(p, world, align):
    blocks = column_blocks(p, world, align)
    assert blocks[0][0] == 0 and blocks[-1][1] == p
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= align
    assert all(a % align == 0 for a, _ in blocks)


def test_column_blocks_rejects_misaligned():
    with pytest.raises(ValueError, match="multiple of the alignment"):
        column_blocks(10, 2, align=4)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize(
    "rows", [[(3, 4), (2, 10)], [(1, 100)], [(5, 3), (0, 8), (4, 7), (9, 1)], [(64, 9), (10, 576)]]
)
def test_row_blocks_cut_at_the_row_boundary_nearest_the_even_split(rows, world):
    p = sum(c * n for c, n in rows)
    boundaries, pos = [0], 0  # every row boundary, by brute force
    for count, length in rows:
        for _ in range(count):
            pos += length
            boundaries.append(pos)
    blocks = row_blocks(rows, world)
    assert len(blocks) == world and blocks[0][0] == 0 and blocks[-1][1] == p
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    for r, (start, _) in enumerate(blocks[1:], start=1):
        goal = r * p / world
        best = min(boundaries, key=lambda b: (abs(b - goal), b))  # nearest, the lower one on a tie
        assert start == max(best, blocks[r - 1][0])


def test_row_blocks_reject_bad_rows():
    with pytest.raises(ValueError, match="length >= 1"):
        row_blocks([(2, 0)], 2)


def test_sample_ranges_cut_at_micro_batches():
    # 56 samples = micro-batches of 16, 16, 16, 8: whole micro-batches per rank, counts differing by at most one
    assert sample_ranges(56, 2, 16) == [(0, 32), (32, 56)]
    assert sample_ranges(56, 3, 16) == [(0, 32), (32, 48), (48, 56)]
    assert sample_ranges(56, 4, 16) == [(0, 16), (16, 32), (32, 48), (48, 56)]
    # fewer micro-batches than ranks: the even split of the samples
    assert sample_ranges(20, 3, 16) == sample_ranges(20, 3) == [(0, 7), (7, 14), (14, 20)]
    assert sample_ranges(7, 3, 1) == sample_ranges(7, 3)
    with pytest.raises(ValueError, match="batch_size"):
        sample_ranges(7, 3, 0)


@pytest.mark.parametrize("world,batch", [(1, 1), (3, 1), (4, 2)])
def test_sample_ranges_accept_exactly_one_sample_per_rank(world, batch):
    """n == world_size is the smallest valid split: every rank gets exactly one sample, [r, r + 1)
    (the docstring's 'every rank must get at least one sample', checked against the hand-written ranges)."""
    assert sample_ranges(world, world, batch) == [(r, r + 1) for r in range(world)]
