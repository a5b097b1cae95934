"""The README's Python example runs as printed, on one process and on two (under torchrun, the process group made
first as the README says), and both prune to the same weights."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELUDE = "import torch.distributed as dist\ndist.init_process_group('gloo')\n"  # what a user's launch script does
FINALE = "\ndist.destroy_process_group()\n"  # ... and at its end, as the README says
EPILOGUE = ("\nimport hashlib, os\n"  # each rank's digests into its own file: the ranks' stdout may interleave
            "state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}\n"
            "with open(f\"digest_{os.environ.get('RANK', '0')}_{os.environ.get('WORLD_SIZE', '1')}.txt\", 'w') as f:\n"
            "    f.write(f'mask {report.mask_sha256}\\n')\n"
            "    f.write('weights ' + hashlib.sha256(b''.join(state[k].numpy().tobytes() for k in sorted(state)))"
            ".hexdigest() + '\\n')\n")


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def run(code: str, processes: int, tmp_path: Path) -> str:
    script = tmp_path / f"example_{processes}.py"
    script.write_text((PRELUDE if processes > 1 else "") + code + EPILOGUE + (FINALE if processes > 1 else ""))
    cmd = ([sys.executable, str(script)] if processes == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            str(script)])
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_readme_python_example_on_one_and_two_processes(tmp_path):
    code = readme_example()
    one, two = run(code, 1, tmp_path), run(code, 2, tmp_path)
    assert "on 1 rank(s)" in one and "on 2 rank(s)" in two
    kept = [line for line in one.splitlines() if line.strip().startswith("kept ")]
    # 10% of fc1 and fc2 (40 x 784 + 20 x 40 = 32,160 weights; the output head fc3 stays dense by default)
    assert kept and kept[0].strip().startswith("kept 3,216 (10.00%)")
    single = (tmp_path / "digest_0_1.txt").read_text().splitlines()
    ranks = [(tmp_path / f"digest_{r}_2.txt").read_text().splitlines() for r in (0, 1)]
    assert single[0].startswith("mask ") and ranks[0][0] == ranks[1][0] == single[0]  # the same mask on 1 and 2
    assert ranks[0][1] == ranks[1][1]  # every rank holds the same pruned model
