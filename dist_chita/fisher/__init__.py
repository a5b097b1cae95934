"""The Fisher objective (the CHITA paper's): per-sample gradients, the column-sharded factor A, the IHT solver,
collective selection, the back-solve, budgets, CHITA++ stages and grouped pruning.
"""
