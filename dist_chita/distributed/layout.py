"""Where each prunable weight lives in the flattened vector w and on which rank.

The prunable weights of a model, in a fixed order, are flattened (row-major,
as ``tensor.reshape(-1)``) and concatenated into w (length p). Layer ``g``
occupies the global range [start_g, stop_g). Rank r owns the column block
[block_start_r, block_stop_r) (see :mod:`dist_chita.distributed.partition`); a layer may
straddle ranks. With ``rows=True`` the blocks are cut at row boundaries (a row = the weights of one
output of the stored weight tensor, ``weight[i]``), so that no row straddles ranks (per-row budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_chita.distributed.partition import column_blocks, row_blocks


@dataclass(frozen=True)
class Segment:
    """One prunable weight tensor: its name, shape and global flat range."""

    name: str
    shape: tuple[int, ...]
    start: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def row_length(self) -> int:
        """Weights per row, ``weight[i].numel()`` (the whole tensor for a 1-D weight)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else self.size


@dataclass(frozen=True)
class Piece:
    """The part of segment ``segment`` that rank-local columns [local_start, local_stop) hold;
    ``offset`` is where it starts inside the segment's own flattened tensor."""

    segment: int
    offset: int
    local_start: int
    local_stop: int

    @property
    def size(self) -> int:
        return self.local_stop - self.local_start


@dataclass(frozen=True)
class ColumnLayout:
    """Segments (layers) and the column block of every rank."""

    segments: tuple[Segment, ...]
    blocks: tuple[tuple[int, int], ...]

    @staticmethod
    def build(
        named_shapes: list[tuple[str, tuple[int, ...]]], world_size: int, align: int = 1, rows: bool = False
    ) -> ColumnLayout:
        """``align``: blocks are multiples of it (N:M groups never straddle ranks); ``rows``: blocks are cut
        at row boundaries (:func:`~dist_chita.distributed.partition.row_blocks`)."""
        if rows and align > 1:
            raise ValueError("column blocks are either aligned to N:M groups or cut at rows, not both")
        segments, start = [], 0
        for name, shape in named_shapes:
            seg = Segment(name, tuple(int(s) for s in shape), start)
            if align > 1 and seg.size % align:
                raise ValueError(f"layer {name} has {seg.size} weights, not a multiple of the N:M group size {align}")
            segments.append(seg)
            start = seg.stop
        if rows:
            blocks = row_blocks([(s.size // s.row_length, s.row_length) for s in segments], world_size)
        else:
            blocks = column_blocks(start, world_size, align)
        return ColumnLayout(tuple(segments), tuple(blocks))

    @property
    def p(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    @property
    def world_size(self) -> int:
        return len(self.blocks)

    def block(self, rank: int) -> tuple[int, int]:
        return self.blocks[rank]

    def pieces(self, rank: int) -> list[Piece]:
        """The segment pieces held by ``rank``, in column order."""
        lo, hi = self.blocks[rank]
        out = []
        for i, seg in enumerate(self.segments):
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if a < b:
                out.append(Piece(i, a - seg.start, a - lo, b - lo))
        return out

    def owners(self, segment: int) -> list[tuple[int, int, int]]:
        """For segment ``segment``: (rank, offset in segment, count) of each rank holding part of it."""
        seg = self.segments[segment]
        out = []
        for r, (lo, hi) in enumerate(self.blocks):
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if a < b:
                out.append((r, a - seg.start, b - a))
        return out
