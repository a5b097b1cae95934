"""How long the README's two set-up commands take on this machine, with what they print last.

Runs, from the repository root, after ``./setup.sh`` (which installs nothing when everything is installed):

1. the default job: ``accelerate launch --config_file launch/accelerate/cpu_2.yaml launch/prune.py`` (into a
   temporary output directory);
2. the tests: ``python3 -m pytest -q``.

Writes benchmarks/results/readme_commands.json: wall seconds of each, the last line each printed (the job's
"saved to" line, pytest's summary line), the machine (CPU model, cores) and the 1-minute load average before and
after each command (other processes on a shared machine slow both down).

    python3 benchmarks/readme_commands.py [--skip-tests]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "readme_commands.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(cmd: list[str], shown: dict[str, str]) -> dict:
    """Runs ``cmd``; its command and last line are recorded with every key of ``shown`` (this machine's paths)
    replaced by its value (what a reader types or sees: ``python3``, ``<out>``)."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    lines = [x for x in res.stdout.replace("\r", "\n").splitlines() if x.strip()]

    def mask(text: str) -> str:
        for path, name in shown.items():
            text = text.replace(path, name)
        return text
    return {"command": mask(" ".join(cmd)), "seconds": round(seconds, 1), "exit_status": res.returncode,
            "last_line": mask(lines[-1].strip() if lines else ""), "load_before": load,
            "load_after": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-tests", action="store_true", help="time the default job only")
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["default_job"] = timed(["accelerate", "launch", "--config_file", "launch/accelerate/cpu_2.yaml",
                                     "launch/prune.py", f"output.dir={Path(tmp) / 'default'}"],
                                    {str(Path(tmp) / "default"): "<out>"})
    if not args.skip_tests:
        runs["tests"] = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                              {sys.executable: "python3"})
    for name, run in runs.items():
        print(f"{name}: {run['seconds']:.0f} s (load {run['load_before']:.1f} -> {run['load_after']:.1f}), exit "
              f"{run['exit_status']}: {run['last_line']}")
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({"machine": {"cpu_model": cpu_model(), "cores": os.cpu_count()},
                                   "runs": {**old.get("runs", {}), **runs}}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all(r["exit_status"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
