"""How work is split across ranks: pure functions of sizes, no communication.

Two splits matter:

* **samples** (rows of the Fisher factor A): rank r computes per-sample
  gradients for a contiguous share of the n calibration samples, cut at micro-batch boundaries, so that every
  micro-batch holds the same samples on any number of ranks (a product's rounding can depend on how many rows it
  has: the factor is then the same bits on any world size);
* **columns** (the p prunable weights): rank r owns the contiguous column block
  A_r = A[:, start_r:stop_r] and the slice w[start_r:stop_r].

Both are as even as possible; the first ``total % parts`` parts get one more
unit. Column blocks can be *aligned* so that no N:M group straddles two ranks, or
cut at row boundaries so that no row of a layer (one output's weights, a per-row budget's group) does.
"""

from __future__ import annotations


def even_counts(total: int, parts: int) -> list[int]:
    """Split ``total`` units into ``parts`` counts that differ by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def ranges_from_counts(counts: list[int]) -> list[tuple[int, int]]:
    """Turn counts into contiguous half-open ranges [start, stop)."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def sample_ranges(n: int, world_size: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """Rows of A computed by each rank: contiguous, as even as possible in whole micro-batches.

    The n samples form ceil(n / batch_size) micro-batches [j b, min((j + 1) b, n)); when there are at least
    ``world_size`` of them, rank r gets a contiguous run of them (the counts differing by at most one), so each
    micro-batch is the same on any world size. With fewer micro-batches than ranks the samples are split evenly
    (then the micro-batches a rank forms depend on the world size). Every rank must get at least one sample.
    """
    if n < world_size:
        raise ValueError(f"n = {n} calibration samples is smaller than the number of ranks ({world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = -(-n // batch_size)
    if batches < world_size:
        return ranges_from_counts(even_counts(n, world_size))
    return [(a * batch_size, min(b * batch_size, n)) for a, b in ranges_from_counts(even_counts(batches, world_size))]


def column_blocks(p: int, world_size: int, align: int = 1) -> list[tuple[int, int]]:
    """Column block [start_r, stop_r) of the p flattened prunable weights per rank.

    Blocks are contiguous, in rank order, and balanced by size in units of
    ``align`` columns (``p`` must be a multiple of ``align``), so that groups
    of ``align`` consecutive weights (N:M groups) never straddle ranks. A rank
    may get an empty block when p / align < world_size.
    """
    if align < 1 or p % align:
        raise ValueError(f"p = {p} is not a multiple of the alignment {align}")
    return [(a * align, b * align) for a, b in ranges_from_counts(even_counts(p // align, world_size))]


def row_blocks(rows: list[tuple[int, int]], world_size: int) -> list[tuple[int, int]]:
    """Column blocks cut only at row boundaries: ``rows`` lists every layer as (number of rows, row length) in
    column order (p = sum of rows * length). Boundary r is the row boundary nearest to r * p / R (the lower one
    on a tie), so each block is within one row of the even split, and no row straddles two ranks. A rank may get
    an empty block."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(count < 0 or length < 1 for count, length in rows):
        raise ValueError(f"rows must be (count >= 0, length >= 1) pairs, got {rows}")
    p = sum(count * length for count, length in rows)
    cuts, start, layer = [0], 0, 0
    for r in range(1, world_size):
        goal = r * p / world_size
        while layer < len(rows) and start + rows[layer][0] * rows[layer][1] <= goal:  # the layer holding the goal
            start += rows[layer][0] * rows[layer][1]
            layer += 1
        if layer == len(rows):
            cuts.append(p)
            continue
        length = rows[layer][1]
        below = start + int((goal - start) // length) * length
        cut = below if goal - below <= below + length - goal else below + length
        cuts.append(max(cut, cuts[-1]))
    cuts.append(p)
    return list(zip(cuts[:-1], cuts[1:], strict=True))
