"""Per-layer pruning methods on the layerwise objective's curvature: the baselines next to CHITA."""
