"""dist-chita: distributed one-shot pruning with CHITA."""
