import sys
from pathlib import Path

# Make `tests.multiproc` and `launch` importable without installing them.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
