"""Stage checkpoints: a CHITA++ run interrupted after a stage and resumed equals the uninterrupted run,
on the same and on other world sizes; saved state of another config is refused naming the difference."""

import pytest
import torch

from dist_chita.distributed import comm
from dist_chita.distributed.partition import sample_ranges
from dist_chita.fisher import driver as fisher_driver
from dist_chita.fisher import losses, resume
from dist_chita.io import models
from dist_chita.io.data import iter_microbatches
from dist_chita.prunable import prunable_modules
from dist_chita.sparsity import kept_count
from tests import multiproc
from tests.fixtures.tiny_models import digits_samples, train_digits_mlp

N, STAGES, SPARSITY = 32, 4, 0.85
SETTINGS = {"prune": {"method": "chita++", "sparsity": SPARSITY, "stages": STAGES}, "n": N}


class Interrupted(Exception):
    pass


def _forward(model, batch):
    return models.forward(model, "image-classification", batch)


def _prune(state_dir, settings=SETTINGS, stop_after=None, resume_run=False, factor_stop=None, sparsity=SPARSITY):
    """CHITA++ on the digits MLP with stage checkpoints in ``state_dir``; ``stop_after``: raise after that many
    stages (the state of the completed ones is on disk); ``resume_run``: continue from the saved state;
    ``factor_stop``: save the Fisher factors and raise right after stage ``factor_stop``'s (0-based) is saved;
    ``sparsity``: a list gives every layer its own target, per row. Returns the weights, the kept counts of the
    stages run and the number of gradient passes."""
    torch.set_num_threads(1)
    model = train_digits_mlp()
    calib = digits_samples().select(range(N))
    modules = prunable_modules(model, exclude_head=False)
    lo, hi = sample_ranges(N, comm.world_size())[comm.rank()]
    ckpt = resume.StageCheckpoint(state_dir, settings)
    saved = ckpt.load() if resume_run else None
    save = ckpt.on_stage_end(saved.reports if saved else ())

    def on_stage_end(t, w, support, report):
        save(t, w, support, report)
        if stop_after is not None and t + 1 == stop_after:
            raise Interrupted(t)

    kw, passes = {}, []
    if factor_stop is not None:

        def on_factor(t, At):
            ckpt.save_factor(t, At)
            if t == factor_stop:
                raise Interrupted(t)

        kw.update(on_factor=on_factor, load_factor=ckpt.load_factor)
    if saved is not None:
        kw.update(start_stage=saved.stages_done, start_weights=saved.weights, start_support=saved.support)
    if not isinstance(sparsity, float):
        kw.update(per_row=True)
    out = fisher_driver.prune(
        model, modules, "chita++", sparsity,
        make_batches=lambda: passes.append(1) or iter_microbatches(calib, lo, hi, 16),
        loss_fn=losses.cross_entropy(_forward), n=N, lam=1e-3, stages=STAGES, base_sparsity=0.3,
        solver_options=dict(max_iter=10, tol=1e-7, escape_trials=0, pair_swaps=0), on_stage_end=on_stage_end, **kw,
    )
    return {name: m.weight.detach().clone() for name, m in modules}, [s.kept for s in out.stages], len(passes)


def _interrupted(state_dir, stop_after):
    try:
        _prune(state_dir, stop_after=stop_after)
    except Interrupted:
        return "interrupted"
    return "finished"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _prune(tmp_path_factory.mktemp("ref") / "state")[:2]


def _same(a, b):
    for name, w in a.items():
        assert torch.equal(b[name] != 0, w != 0), name
        assert torch.allclose(b[name], w, rtol=1e-5, atol=1e-6 * float(w.abs().max())), name


def test_resume_after_stage_two_equals_the_uninterrupted_run(tmp_path, reference):
    ref_w, ref_kept = reference
    state = tmp_path / "state"
    assert _interrupted(state, stop_after=2) == "interrupted"
    saved = resume.StageCheckpoint(state, SETTINGS).load()
    assert saved.stages_done == 2 and saved.support.dtype == torch.bool
    assert int(saved.support.sum()) == ref_kept[1] and len(saved.reports) == 2
    assert [p.name for p in state.iterdir()] == ["state.pt"]  # no temporaries left
    weights, kept, passes = _prune(state, resume_run=True)
    assert kept == ref_kept[2:] and passes == STAGES - 2
    for name, w in ref_w.items():  # same process count, same arithmetic: bit-identical
        assert torch.equal(weights[name], w), name
    after = resume.StageCheckpoint(state, SETTINGS).load()
    assert after.stages_done == STAGES and [r["kept"] for r in after.reports] == ref_kept


def test_resume_with_per_layer_targets_equals_the_uninterrupted_run(tmp_path):
    """Per-layer targets (per row; every layer along its own schedule): stopped after stage 2 and resumed, the
    same model and stage counts as the uninterrupted run."""
    targets = [0.9, 0.6, 0.75]
    settings = {**SETTINGS, "layer_targets": targets}
    ref_w, ref_kept, _ = _prune(tmp_path / "ref", settings, sparsity=targets)
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        _prune(state, settings, stop_after=2, sparsity=targets)
    weights, kept, passes = _prune(state, settings, resume_run=True, sparsity=targets)
    assert kept == ref_kept[2:] and passes == STAGES - 2 and len(set(ref_kept)) == STAGES
    for name, w in ref_w.items():
        assert torch.equal(weights[name], w), name
    for w, s in zip(ref_w.values(), targets, strict=True):  # every row of layer l at its own target
        assert bool(((w != 0).sum(1) == kept_count(w.shape[1], s)).all())


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 3)])
def test_resume_on_another_world_size_reslices_the_state(tmp_path, reference, saved_on, resumed_on):
    state = tmp_path / "state"
    assert set(multiproc.run(_interrupted, saved_on, state, 3)) == {"interrupted"}
    results = multiproc.run(_prune, resumed_on, state, SETTINGS, None, True)
    for weights, kept, _ in results:
        assert kept == reference[1][3:]
        _same(reference[0], weights)


def test_saved_factor_spares_the_gradient_phase_on_resume(tmp_path, reference):
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        _prune(state, factor_stop=2)  # stopped after stage 3's gradients, before its solver
    assert sorted(p.name for p in state.iterdir()) == ["factor-stage3-rank0-of1.pt", "state.pt"]
    weights, kept, passes = _prune(state, resume_run=True, factor_stop=-1)
    assert kept == reference[1][2:] and passes == STAGES - 3  # stage 3's factor was loaded
    for name, w in reference[0].items():
        assert torch.equal(weights[name], w), name
    assert sorted(p.name for p in state.iterdir()) == ["state.pt"]
    # a factor of another world size is not used: recomputed
    with pytest.raises(Interrupted):
        _prune(tmp_path / "s2", factor_stop=1)
    results = multiproc.run(_prune, 2, tmp_path / "s2", SETTINGS, None, True, -1)
    assert [r[2] for r in results] == [STAGES - 1] * 2
    _same(reference[0], results[0][0])


def test_state_of_another_config_is_refused_naming_the_difference(tmp_path):
    state = tmp_path / "state"
    assert _interrupted(state, stop_after=1) == "interrupted"
    other = {**SETTINGS, "prune": {**SETTINGS["prune"], "sparsity": 0.9}}
    with pytest.raises(resume.ResumeError, match=r"different config \(prune\.sparsity: 0\.85 -> 0\.9\)"):
        resume.StageCheckpoint(state, other).load()
    assert resume.StageCheckpoint(state, SETTINGS).load().stages_done == 1


def test_no_state_and_unreadable_state(tmp_path):
    assert resume.StageCheckpoint(tmp_path / "none", SETTINGS).load() is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(resume.ResumeError, match="cannot read the saved state"):
        resume.StageCheckpoint(tmp_path / "bad", SETTINGS).load()
    ckpt = resume.StageCheckpoint(tmp_path / "bad", SETTINGS)
    ckpt.remove()
    assert not (tmp_path / "bad").exists()


def test_differences_and_default_directory(tmp_path):
    assert resume.differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c: 2 -> 3"
    assert resume.differences({"x": 1}, {"y": 1}) == "x: 1 -> '<unset>', y: '<unset>' -> 1"
    many = resume.differences({str(i): i for i in range(5)}, {str(i): -i - 1 for i in range(5)}, limit=2)
    assert many.endswith("and 3 more")
    assert resume.state_dir_for(tmp_path / "out") == (tmp_path / "out.state").resolve()
    assert resume.fingerprint({"a": 1, "b": 2}) == resume.fingerprint({"b": 2, "a": 1})
    assert resume.fingerprint({"a": 1}) != resume.fingerprint({"a": 2})
