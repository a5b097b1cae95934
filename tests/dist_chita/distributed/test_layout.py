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
