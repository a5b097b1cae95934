"""Memory estimates, the cost model and scaling tables: what a run will need and how it scales."""
