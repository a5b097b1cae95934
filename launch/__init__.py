"""The recipes around the library: configs, launching, planning (``dist-chita`` is :mod:`launch.cli`)."""
