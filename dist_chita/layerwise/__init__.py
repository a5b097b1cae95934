"""The layerwise objective: each layer's reconstruction curvature H = X^T X, computed block after block on the inputs
of the already pruned model, and a per-layer method (:mod:`dist_chita.methods`: CHITA's row solver or a baseline) on it.

* :mod:`.geometry`: a layer's weights as rows (one per output) and the inputs X those rows see;
* :mod:`.curvature`: H per layer over all ranks, the calibration micro-batches of a rank, the blocks and their
  cached inputs;
* :mod:`.driver`: :func:`~.driver.prune_layerwise` (blocks in order, each layer handed to the method, rows shared
  among ranks, all-reduce and write-back), :func:`~.driver.prune_magnitude`, :func:`~.driver.memory_bytes`;
* :mod:`.row_solver`: CHITA on one layer's rows (pure math);
* :mod:`.allocation`: OWL's per-block sparsities.
"""
