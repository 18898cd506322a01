"""fit over ConsistencyObjective: CD and CT runs, checkpoints, exact resume, errors, the CLI."""

import math

import pytest
import torch

from probgen.cli import main
from probgen.inference import TrainingError, fit
from probgen.models import load_method
from probgen.models.consistency import Consistency, ConsistencyObjective
from probgen.models.score_sde import ScoreSDE

SDE = dict(sde="ve", sigma_min=0.01, sigma_max=8.0)
NET = dict(hidden=(16, 16), embed_dim=8)


def _data(n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) + torch.tensor([1.0, -1.0])


def _teacher() -> ScoreSDE:
    torch.manual_seed(1)
    return ScoreSDE(2, **SDE, **NET)


def _cm(**kw) -> Consistency:
    torch.manual_seed(0)
    return Consistency(2, **SDE, sigma_data=1.0, num_scales=8, **NET, **kw)


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _fit(cm, x, teacher=None, **kw):
    return fit(cm, x, objective=cm.objective(teacher=teacher), **kw)


def test_the_objective_of_a_consistency_model():
    assert isinstance(_cm().objective(), ConsistencyObjective) and _cm().objective().mode == "training"
    assert _cm().objective(teacher=_teacher()).mode == "distillation"


def test_distillation_and_training_runs_save_loadable_checkpoints(tmp_path):
    x = _data()
    for mode, teacher in (("distillation", _teacher()), ("training", None)):
        cm = _cm()
        meta = {"data": "toy"}
        run = tmp_path / mode
        result = _fit(
            cm, x, val_data=x[:64], steps=6, batch_size=32, teacher=teacher, val_every=3, log_every=2,
            run_dir=run, metadata=meta, progress=False, ema_decay=0.9,
        )  # fmt: skip
        assert result.step == 6 and "Wasserstein" in result.val_metric
        assert [s for s, _ in result.history["train"]] == [2, 4, 6]
        assert all(math.isfinite(v) for _, v in result.history["train"] + result.history["val"])
        assert len(result.history["val"]) == 2
        loaded, saved = load_method(run, "last", expected="consistency")
        assert isinstance(loaded, Consistency) and saved["objective"]["mode"] == mode
        assert loaded.sample(5, steps=2).shape == (5, 2)


def test_the_target_network_trails_the_online_one():
    cm = _cm(target_decay=0.5)
    before = _state(cm)
    objective = cm.objective(teacher=_teacher())
    trail = []  # after every step: theta^- = mu theta^- + (1 - mu) theta, checked against the copy
    expected = {k: v.clone() for k, v in before.items()}

    def check(step, loss):
        online = cm.state_dict()
        for k, v in objective.target.state_dict().items():
            if v.is_floating_point() and k in dict(cm.named_parameters()):
                expected[k] = 0.5 * expected[k] + 0.5 * online[k]
                trail.append(torch.allclose(v, expected[k], atol=1e-6))

    fit(cm, _data(), objective=objective, steps=3, batch_size=32, progress=False, callback=check)
    moved = [k for k in before if not torch.equal(before[k], cm.state_dict()[k])]
    assert moved, "the online network did not move"
    assert trail and all(trail), "the target is not the EMA of the online parameters with mu = 0.5"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    x = _data()
    kw = dict(batch_size=32, teacher=_teacher(), progress=False, checkpoint_every=2, val_every=2)
    straight = _cm()
    _fit(straight, x, steps=6, run_dir=tmp_path / "a", **kw)
    split = _cm()
    _fit(split, x, steps=4, run_dir=tmp_path / "b", **kw)
    resumed = _cm()
    _fit(resumed, x, steps=6, run_dir=tmp_path / "b", resume=True, **kw)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_errors():
    x = _data()
    with pytest.raises(ValueError, match="same SDE"):
        _fit(_cm(), x, steps=1, batch_size=8, teacher=ScoreSDE(2, sde="vp"), progress=False)
    with pytest.raises(ValueError, match="data shape"):
        _fit(_cm(), x, steps=1, batch_size=8, teacher=ScoreSDE(3, **SDE), progress=False)
    with pytest.raises(ValueError, match="Consistency model"):
        ConsistencyObjective(_teacher())
    cm = _cm()
    with torch.no_grad():
        cm.net.out.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="Non-finite loss at step 1"):
        _fit(cm, x, steps=2, batch_size=8, progress=False)


def test_cli_distils_a_teacher_run_and_samples(tmp_path, capsys):
    from probgen.data import load_dataset

    train = load_dataset("eight_gaussians", "train", n=512)
    teacher = ScoreSDE.from_data(train, sde="ve", hidden=[16], embed_dim=8)
    meta = {"data": "eight_gaussians", "form": "int"}
    fit(teacher, train.x, steps=2, batch_size=32, run_dir=tmp_path / "t", metadata=meta, progress=False)
    run = tmp_path / "cd"
    argv = ["train", "consistency", "--data", "eight_gaussians", "--out", str(run), "--no-progress"]
    argv += ["--steps", "4", "--val-every", "2", "--batch-size", "32", "--device", "cpu"]
    argv += ["--set", f"teacher={tmp_path / 't'}", "--set", "hidden=[16]", "--set", "embed_dim=8"]
    assert main(argv) == 0, capsys.readouterr().err
    png = tmp_path / "s.png"
    sample = ["sample", str(run), "--sampler", "consistency", "--out", str(png)]
    assert main(sample + ["--steps", "2", "--num", "16"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(sample + ["--steps", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    # A teacher whose SDE contradicts the asked one is one clear error line (without --set sde, the
    # model would take the teacher's VP SDE).
    vp = ScoreSDE.from_data(train, sde="vp", hidden=[16], embed_dim=8)
    meta = {"data": "eight_gaussians", "form": "int"}
    fit(vp, train.x, steps=1, batch_size=32, run_dir=tmp_path / "vp", metadata=meta, progress=False)
    argv[5] = str(tmp_path / "cd2")
    argv[argv.index(f"teacher={tmp_path / 't'}")] = f"teacher={tmp_path / 'vp'}"
    assert main(argv + ["--set", "sde=ve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Expected sde='ve' to match the teacher's SDE, but found sde='vp'" in err[0], err
