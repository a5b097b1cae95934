"""The layerwise objective: each layer's reconstruction curvature H = X^T X, computed block after block on the inputs
of the already pruned model, and CHITA's row solver on it.
"""
