"""The interface of a per-layer pruning method, and the methods known by name.

The layerwise driver (:func:`dist_chita.layerwise.driver.prune_layerwise`) shows a method one layer at a time, as
SparseGPT's code does: a :class:`LayerProblem` holds the layer's dense rows W_bar (r, d) (row i: the weights of
output i), the curvature H = X^T X / N of each part of its rows (one part; a grouped Conv2d's groups), the ridge
lambda of each part, the sparsity and how it is counted (per row, per layer, N:M), which weights are already zero,
and the rows this rank prunes. The method returns a :class:`LayerResult`: those rows pruned and its reconstruction
objective, f_i = 1/2 (w_i - w_bar_i)^T (H + lambda I) (w_i - w_bar_i) summed over the rows.

A method says what it needs (``needs_curvature``: H, computed block after block on the inputs of the already pruned
model; ``needs_fisher_diagonal``: the diagonal of the loss's empirical Fisher on the dense model) and how its work is
shared among the ranks (:meth:`LayerMethod.owners`: None, rows in fixed chunks; else whole parts of rows, each on
one rank). Adding a method is one new module in this package: a subclass of :class:`LayerMethod` (or of
:class:`ScoreMethod`) decorated with :func:`register`. The package imports all its modules, so the new name is known
to ``prune_layerwise(method=...)`` with no change elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dist_chita.layerwise.row_solver import ROW_CHUNK, chunk_rows, keep_mask, objectives, ridged, row_budgets
from dist_chita.sparsity import kept_count


@dataclass(frozen=True)
class LayerProblem:
    """One layer as the driver shows it to a method (all tensors on the layer's device).

    W_bar: (r, d) float32, the dense rows w_bar_i. It may be the layer's weight itself: a method reads it and never
        writes it (the driver overwrites it when it writes the pruned layer back).
    sparsity: the layer's target s: the share of every row's weights to prune, or with ``per_layer`` of the layer's
        (0 with N:M).
    per_layer: the layer's budget kept_count(r d, s) is shared among its rows by the method's saliency
        (:meth:`row_budget`); else every row keeps kept_count(d, s).
    nm: (N, M): N kept of every M consecutive inputs of a row, instead of a budget.
    allowed: (r, d) bool, False for weights already zero (they stay zero); default W_bar != 0.
    parts: g row ranges [lo, hi), part j seeing H[j] (g > 1 only for a grouped Conv2d); default one part.
    runs: the rows this rank prunes, as (part j, lo, hi); the method's W is zero elsewhere. Default: all rows.
    H: (g, d, d) float64, each part's H = X^T X / N; None when the method needs none.
    lams: the ridge lambda of each part (``damp`` times the part's mean diag H); empty without H.
    damp: the ridge's share of mean diag H.
    fisher: (r, d) float64, F_jj of every weight in the rows' layout (methods that ask for it), else None.
    row_chunk: rows solved together (CHITA: the unit of the result's bits, :func:`row_solver.solve_rows`).
    options: keywords of the method's solver.
    """

    W_bar: torch.Tensor
    sparsity: float
    per_layer: bool = False
    nm: tuple[int, int] | None = None
    allowed: torch.Tensor | None = None
    parts: tuple[tuple[int, int], ...] | None = None
    runs: tuple[tuple[int, int, int], ...] | None = None
    H: torch.Tensor | None = None
    lams: tuple[float, ...] = ()
    damp: float = 0.01
    fisher: torch.Tensor | None = None
    row_chunk: int = ROW_CHUNK
    options: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.allowed is None:
            object.__setattr__(self, "allowed", self.W_bar != 0)
        if self.parts is None:
            object.__setattr__(self, "parts", ((0, self.W_bar.shape[0]),))
        if self.runs is None:
            object.__setattr__(self, "runs", tuple((j, lo, hi) for j, (lo, hi) in enumerate(self.parts)))

    @property
    def shares_budget(self) -> bool:
        """Whether the rows share the layer's budget (per layer, no N:M): :meth:`row_budget` needs a saliency."""
        return self.per_layer and self.nm is None

    def row_budget(self, saliency: torch.Tensor | None = None) -> int | torch.Tensor | None:
        """k of every row: None with N:M; kept_count(d, s) for every row; or, when :attr:`shares_budget`, (r,)
        integers: each row's count among the layer's kept_count(r d, s) largest ``saliency`` (r, d) of the allowed
        weights (:func:`~dist_chita.layerwise.row_solver.row_budgets`; computed from the whole layer, so every rank
        gets the same)."""
        if self.nm is not None:
            return None
        r, d = self.W_bar.shape
        if not self.per_layer:
            return kept_count(d, self.sparsity)
        if saliency is None:
            raise ValueError("a budget per layer is shared among the rows by a saliency: give one")
        return row_budgets(saliency, kept_count(r * d, self.sparsity), self.allowed)


@dataclass
class LayerResult:
    """W: (r, d) the rows of ``layer.runs`` pruned (and updated, if the method does), zero elsewhere.
    objective: sum over those rows of f_i (the reconstruction objective), None for a method without H.
    warm_objective: the same for the method's starting point, if it has one (CHITA: its warm start).
    magnitude_objective: the same for the magnitude support re-fitted, if the method computes it.
    iterations: the method's iterations (0 for a method without)."""

    W: torch.Tensor
    objective: float | None
    warm_objective: float | None = None
    magnitude_objective: float | None = None
    iterations: int = 0


def held_rows_bytes(dims: Sequence[tuple[int, int]], blocks: Sequence[Sequence[int]]) -> int:
    """The pruned rows (float32) of every layer of the largest block, which the layerwise driver keeps until the
    block is written back: the most 4 r d summed over a block's layers of ``dims`` (rows, inputs)."""
    return max(sum(4 * dims[i][0] * dims[i][1] for i in block) for block in blocks)


class LayerMethod(ABC):
    """A per-layer pruning method: :meth:`prune` one :class:`LayerProblem` at a time. Stateless: one instance may
    prune every layer."""

    name: ClassVar[str]
    needs_curvature: ClassVar[bool] = True  # H of every part: the calibration passes, block after block
    needs_fisher_diagonal: ClassVar[bool] = False  # F_jj of the loss: needs prune_layerwise(loss_fn=...)

    def owners(self, shapes: Mapping[tuple[int, int], tuple[int, int]], world: int
               ) -> dict[tuple[int, int], int] | None:
        """How the work of a block is shared among ``world`` ranks. ``shapes``: (layer, part) -> (rows, inputs) of
        every part of the block's layers. None (the default): every row is a problem of its own; each layer's rows
        go to the ranks in whole chunks of ``row_chunk`` rows. Else the rank of every (layer, part): the part is
        pruned whole there. Either way every rank prunes all its rows of a block before the block is written back."""
        return None

    def solve_bytes(self, dims: Sequence[tuple[int, int]], blocks: Sequence[Sequence[int]]) -> int:
        """Peak bytes per rank of the method's work besides the model and the blocks' H, for layers of ``dims``
        (rows, inputs) grouped into ``blocks``. The default bounds a solve of CHITA's size: the Q of a layer in
        float32 and, at most at once, its float64 copy and Cholesky factor; about 40 float32 (c, d) matrices for a
        chunk of c rows (iterates, candidates, CG); the layer's weight as read, its rows in float32 and their
        all-reduced copy; and the pruned rows of every layer of the largest block (float32), kept until the block
        is written back."""
        return max(20 * d * d + 40 * 4 * min(r, chunk_rows(d)) * d + 12 * r * d for r, d in dims) + held_rows_bytes(
            dims, blocks)

    @abstractmethod
    def prune(self, layer: LayerProblem) -> LayerResult:
        """The rows ``layer.runs`` of ``layer`` pruned (:class:`LayerResult`)."""


class ScoreMethod(LayerMethod):
    """A method that scores every weight (:meth:`scores`, larger = keep), keeps the largest scores of every row
    (its budget; with ``per_layer`` the layer's largest, counted per row; or N of every M), ties to the lower index,
    and updates nothing (w_i = w_bar_i on the kept weights)."""

    @abstractmethod
    def scores(self, layer: LayerProblem) -> torch.Tensor:
        """S (r, d) for every weight of the layer (all rows: the per-layer budgets need them)."""

    def prune(self, layer: LayerProblem) -> LayerResult:
        S = self.scores(layer)
        k = layer.row_budget(S)
        W = torch.zeros_like(layer.W_bar)
        for _, lo, hi in layer.runs:
            k_rows = k[lo:hi] if isinstance(k, torch.Tensor) else k
            W[lo:hi] = layer.W_bar[lo:hi] * keep_mask(S[lo:hi], k_rows, layer.nm, layer.allowed[lo:hi])
        return LayerResult(W=W, objective=reconstruction_objective(layer, W))


def reconstruction_objective(layer: LayerProblem, W: torch.Tensor) -> float | None:
    """sum_i f_i over the rows ``layer.runs`` of W (r, d): f_i = 1/2 (w_i - w_bar_i)^T Q_j (w_i - w_bar_i),
    Q_j = H_j + lambda_j I of the row's part, in float64; None without H."""
    if layer.H is None:
        return None
    Qs: dict[int, torch.Tensor] = {}  # part -> Q in float64, formed once (the same for any split of the rows)
    f = 0.0
    for j, lo, hi in layer.runs:
        if j not in Qs:
            Qs[j] = ridged(layer.H[j], layer.lams[j]).double()
        f += float(objectives((W[lo:hi] - layer.W_bar[lo:hi]).double(), Qs[j]).sum())
    return f


REGISTRY: dict[str, type[LayerMethod]] = {}


def register(cls: type[LayerMethod]) -> type[LayerMethod]:
    """Class decorator: make ``cls`` known by ``cls.name``. A name another class holds raises ValueError."""
    held = REGISTRY.get(cls.name)
    if held is not None and held is not cls:
        raise ValueError(f"layerwise method name {cls.name!r} is taken by {held.__module__}.{held.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """The names of the registered methods, sorted."""
    return sorted(REGISTRY)


def resolve_method(method: str | LayerMethod) -> LayerMethod:
    """A method object as given, or a new instance of the registered method named ``method``; an unknown name
    raises a one-line ValueError listing the known ones."""
    if isinstance(method, LayerMethod):
        return method
    cls = REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"unknown layerwise method {method!r} (one of {', '.join(method_names())})")
    return cls()

