"""Started by tests/launch/test_accelerate_configs.py under ``accelerate launch``: prints one JSON line
per process with its rank, world size, backend and device, as seen by torch.distributed."""

import json
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator

torch.set_num_threads(1)
acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group, MULTI_CPU state
if dist.is_available() and dist.is_initialized():
    world, rank, backend = dist.get_world_size(), dist.get_rank(), dist.get_backend()
else:
    world, rank, backend = 1, 0, None
print(json.dumps({"rank": rank, "world_size": world, "backend": backend, "pid": os.getpid(),
                  "num_processes": acc.num_processes, "device": str(acc.device)}), flush=True)
