"""dist_chita.io.params: plain parameters (no copies, no communication) and DeepSpeed ZeRO-3 parameters partitioned
over 2 real gloo processes (gathered reads, writes kept by every rank's partition, full state dict on rank 0)."""

import os

import pytest
import torch
from torch import nn

from dist_chita.io import params
from tests.multiproc import run


def _tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's head
    return model


def test_plain_parameters_are_read_in_place_and_written_through():
    model = _tied()
    w = model[0].weight
    assert not params.is_partitioned(w) and not params.any_partitioned(model)
    assert params.shape(w) == (6, 4) and params.numel(w) == 24
    got = params.read(w)
    assert got.data_ptr() == w.data_ptr() and not got.requires_grad  # no copy
    params.write(w, torch.arange(24.0).reshape(6, 4).double())
    assert torch.equal(model[1].weight, torch.arange(24.0).reshape(6, 4)) and w.dtype == torch.float32
    with pytest.raises(ValueError, match=r"shape \(4, 6\) into a parameter of shape \(6, 4\)"):
        params.write(w, torch.zeros(4, 6))
    assert params.resident_bytes(model.parameters()) == params.full_bytes([w, w]) == 24 * 4  # tied: once
    sd = params.full_state_dict(model)
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def _zero3_worker():
    from dist_chita.distributed import comm

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(comm.rank()), RANK=str(comm.rank()), WORLD_SIZE=str(comm.world_size()),
                      LOCAL_WORLD_SIZE=str(comm.world_size()))
    import deepspeed

    from launch.prune import skip_deepspeed_shm_build

    skip_deepspeed_shm_build()  # as the launcher does on CPU

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group tests.multiproc created
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    w = model[0].weight
    out = {"partitioned": params.is_partitioned(w), "any": params.any_partitioned(model),
           "shape": tuple(params.shape(w)), "torch_shape": tuple(w.shape), "numel": params.numel(w),
           "resident": params.resident_bytes(model.parameters()), "full": params.full_bytes(model.parameters())}
    dense = params.read(w)
    out["read"] = dense
    out["released_after_read"] = w.data.numel()
    new = torch.arange(35.0).reshape(7, 5)
    params.write(w, new)  # the same value on every rank
    out["released_after_write"] = w.data.numel()
    out["read_back"] = params.read(w)
    out["partition"] = w.ds_tensor.detach().clone()
    out["state"] = params.full_state_dict(model)
    return out


def test_zero3_parameters_over_two_ranks(tmp_path, monkeypatch):
    """Also: DeepSpeed's CPU op is not built, so a lock file left by a killed build (as a process killed while
    building leaves it) cannot stall the run."""
    stale = tmp_path / "torch_extensions" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    r0, r1 = run(_zero3_worker, 2, timeout=240)
    for r in (r0, r1):
        assert r["partitioned"] and r["any"] and r["shape"] == (7, 5) and r["torch_shape"] == (0,)
        assert r["numel"] == 35 and r["released_after_read"] == 0 and r["released_after_write"] == 0
        # each rank holds its half (each parameter padded to a multiple of 2): 18 + 4 + 11 + 2 floats
        assert r["full"] == (35 + 7 + 21 + 3) * 4 and r["resident"] == (18 + 4 + 11 + 2) * 4
        assert torch.equal(r["read_back"], torch.arange(35.0).reshape(7, 5))
    assert torch.equal(r0["read"], r1["read"]) and r0["read"].shape == (7, 5)
    # the two partitions are the two halves of the written value (rank 1's padded with a zero)
    flat = torch.cat([r0["partition"], r1["partition"]])
    assert torch.equal(flat[:35], torch.arange(35.0)) and r0["partition"].numel() == 18
    assert set(r0["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"} and r1["state"] == {}
    assert torch.equal(r0["state"]["0.weight"], torch.arange(35.0).reshape(7, 5))
    assert r0["state"]["2.weight"].shape == (3, 7)
