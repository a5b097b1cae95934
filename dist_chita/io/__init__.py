"""Models, data, partitioned (ZeRO-3) parameters and atomic output directories."""
