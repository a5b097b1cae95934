import pytest
import torch

from dist_chita.distributed.layout import ColumnLayout


def test_pieces_reassemble_every_layer():
    shapes = [("a", (3, 5)), ("b", (7,)), ("c", (2, 2, 3))]
    flat = torch.arange(15 + 7 + 12)
    for world in (1, 2, 3, 4, 5):
        layout = ColumnLayout.build(shapes, world)
        rebuilt = {name: torch.full((int(torch.tensor(s).prod()),), -1) for name, s in shapes}
        for r in range(world):
            lo, hi = layout.block(r)
            local = flat[lo:hi]
            for piece in layout.pieces(r):
                seg = layout.segments[piece.segment]
                part = local[piece.local_start : piece.local_stop]
                rebuilt[seg.name][piece.offset : piece.offset + piece.size] = part
        assert torch.equal(torch.cat([rebuilt[n] for n, _ in shapes]), flat)
        owners = [layout.owners(i) for i in range(3)]
        assert all(sum(c for _, _, c in o) == layout.segments[i].size for i, o in enumerate(owners))


def test_row_cut_layout_keeps_every_row_on_one_rank():
    shapes = [("a", (3, 5)), ("b", (7,)), ("c", (4, 2, 3)), ("d", (6, 2))]
    for world in (1, 2, 3, 4, 5):
        layout = ColumnLayout.build(shapes, world, rows=True)
        assert layout.blocks[0][0] == 0 and layout.blocks[-1][1] == layout.p
        for r in range(world):
            for piece in layout.pieces(r):
                length = layout.segments[piece.segment].row_length
                assert piece.offset % length == 0 and piece.size % length == 0
    assert [s.row_length for s in ColumnLayout.build(shapes, 1).segments] == [5, 7, 6, 2]


def test_align_two_checks_n_m_groups_and_refuses_rows():
    """align = 2 (1:2 / 2:2 groups) is an N:M alignment like any other: a layer of an odd number of weights is
    refused, and combining it with row cuts is refused, exactly as for align = 4."""
    with pytest.raises(ValueError, match="not a multiple of the N:M group size 2"):
        ColumnLayout.build([("a", (2, 2)), ("b", (3,))], 2, align=2)
    with pytest.raises(ValueError, match="either aligned to N:M groups or cut at rows"):
        ColumnLayout.build([("a", (2, 2))], 2, align=2, rows=True)
    layout = ColumnLayout.build([("a", (2, 2)), ("b", (3, 2))], 3, align=2)  # even sizes: accepted
    assert all(lo % 2 == 0 and hi % 2 == 0 for lo, hi in layout.blocks)


@pytest.mark.parametrize("world", [2, 3, 4, 6, 9])
def test_pieces_and_owners_are_never_empty(world):
    """A rank holds a piece of a layer only if it holds at least one of its weights, and a layer's owners are
    exactly the ranks whose block overlaps it (brute force over the columns): layers that end exactly at a block
    boundary and the empty blocks of world > p give no zero-size pieces or zero-count owners."""
    shapes = [("a", (2, 2)), ("b", (2,)), ("c", (1, 2))]  # p = 8, layer ends at 4 and 6
    layout = ColumnLayout.build(shapes, world)
    for r in range(world):
        lo, hi = layout.block(r)
        held = sorted({i for i, s in enumerate(layout.segments) for c in range(lo, hi) if s.start <= c < s.stop})
        pieces = layout.pieces(r)
        assert all(p.size > 0 for p in pieces)
        assert [p.segment for p in pieces] == held
    for i, seg in enumerate(layout.segments):
        ranks = [r for r, (lo, hi) in enumerate(layout.blocks) if any(lo <= c < hi for c in range(seg.start, seg.stop))]
        owners = layout.owners(i)
        assert all(count > 0 for _, _, count in owners)
        assert [r for r, _, _ in owners] == ranks
