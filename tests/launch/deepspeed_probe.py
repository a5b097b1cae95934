"""Started by tests/launch/test_accelerate_configs.py under ``accelerate launch`` with a DeepSpeed config:
prints one JSON line per process with the world size, backend, distributed type and ZeRO stage, after
``accelerator.prepare`` has wrapped a small model."""

import json

import torch
import torch.distributed as dist
from accelerate import Accelerator

torch.set_num_threads(1)
acc = Accelerator()
ds = acc.state.deepspeed_plugin.deepspeed_config
ds["train_micro_batch_size_per_gpu"] = 1
ds["train_batch_size"] = dist.get_world_size()
model = torch.nn.Linear(4, 2)
model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
print(json.dumps({"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                  "type": str(acc.distributed_type).split(".")[-1], "zero_stage": acc.state.deepspeed_plugin.zero_stage,
                  "engine": type(model).__name__}), flush=True)
