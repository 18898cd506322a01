import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import probgen.inference
from probgen.checkpoint import CheckpointError, load_checkpoint, read_json
from probgen.cli import main
from probgen.inference import TrainingError
from probgen.models import VAE, load_method

TINY = ["--steps", "20", "--val-every", "10", "--set", "hidden=[16]", "--set", "latent_dim=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(run_dir, data="digits", *extra):
    return main(
        [
            "train",
            "vae",
            "--data",
            data,
            "--out",
            str(run_dir),
            "--no-progress",
            "--device",
            "cpu",
            *TINY,
            *extra,
        ]
    )


def _model_state(run_dir, tag="last"):
    tensors, info = load_checkpoint(run_dir, tag)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, info["metadata"]


def _assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("probgen: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "vae-digits"
    assert _train(run_dir) == 0
    return run_dir


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A private copy of the trained digits run, for tests that damage it."""
    return Path(shutil.copytree(digits_run, tmp_path / "copy"))


# ----------------------------------------------------------------------------- the pipeline


def test_digits_train_sample_evaluate_inspect(digits_run, tmp_path, capsys):
    state, meta = _model_state(digits_run)
    assert meta["step"] == 20 and meta["method"] == "vae" and meta["data"] == "digits"
    assert meta["form"] == "int" and meta["event_shape"] == [1, 8, 8] and meta["num_levels"] == 17
    assert meta["config"]["hidden"] == [16] and meta["config"]["latent_dim"] == 2
    assert [s for s, _ in meta["history"]["val"]] == [10, 20]
    assert (digits_run / "loss.png").read_bytes().startswith(PNG_MAGIC)

    png, npz = tmp_path / "samples.png", tmp_path / "samples.npz"
    assert main(["sample", str(digits_run), "--num", "16", "--out", str(png), "--npz", str(npz)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC) and imread(png).ndim == 3
    with np.load(npz) as arrays:
        assert arrays["samples"].shape == (16, 1, 8, 8)
        levels = arrays["levels"]
        assert levels.min() >= 0 and levels.max() <= 16 and np.array_equal(levels, levels.round())
    # The same seed gives the same samples.
    npz2 = tmp_path / "again.npz"
    assert main(["sample", str(digits_run), "--num", "16", "--out", str(png), "--npz", str(npz2)]) == 0
    with np.load(npz) as a, np.load(npz2) as b:
        assert np.array_equal(a["samples"], b["samples"])
    capsys.readouterr()

    out_json = tmp_path / "eval.json"
    args = [
        "evaluate",
        str(digits_run),
        "--num-samples",
        "3",
        "--num-generated",
        "100",
        "--json",
        str(out_json),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "Fréchet" in printed and "floor" in printed
    report = json.loads(out_json.read_text())
    assert {"method", "data", "nll", "samples", "num_test", "seconds", "checkpoint"} <= set(report)
    assert report["checkpoint"]["tag"] == "best" and report["num_test"] == 297
    assert report["nll"]["bits_per_dim"] > 0 and report["samples"]["frechet_distance"]["floor"] >= 0
    assert f"{report['nll']['bits_per_dim']:.4f}" in printed

    assert main(["inspect", str(digits_run), "--batch", "4", "--json", str(tmp_path / "trace.json")]) == 0
    printed = capsys.readouterr().out
    assert "trace of one batch of 4" in printed and "observed" in printed and "ELBO" in printed
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["batch_size"] == 4 and {s["name"] for s in trace["sites"]} == {"x", "z"}


def test_evaluate_writes_into_the_run_dir_by_default(run_copy, capsys):
    assert main(["evaluate", str(run_copy), "--num-samples", "2", "--num-generated", "50"]) == 0
    report = read_json(run_copy / "evaluation.json")
    assert report["method"] == "vae" and report["samples"]["num_generated"] == 50


def test_toy_train_sample_evaluate_inspect(tmp_path, capsys):
    run_dir = tmp_path / "toy"
    assert _train(run_dir, "eight_gaussians") == 0
    out = capsys.readouterr().out
    assert "best validation loss" in out and str(run_dir / "loss.png") in out
    meta = read_json(run_dir / "best.json")["metadata"]
    assert meta["event_shape"] == [2] and meta["num_levels"] is None
    assert meta["config"]["likelihood"] == "gaussian"

    png = tmp_path / "scatter.png"
    assert main(["sample", str(run_dir), "--num", "500", "--out", str(png), "--tag", "last"]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)

    args = ["evaluate", str(run_dir), "--num-samples", "2", "--num-generated", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "entropy 2.8316" in printed and "sliced Wasserstein" in printed and "modes captured" in printed
    report = read_json(run_dir / "evaluation.json")
    assert report["nll"]["entropy_floor"] == pytest.approx(2.8316, abs=1e-4)
    assert report["nll"]["bits_per_dim"] is None
    assert {"sliced_wasserstein", "mmd", "mode_coverage"} <= set(report["samples"])

    assert main(["inspect", str(run_dir)]) == 0
    assert "Normal" in capsys.readouterr().out


def test_local_uint8_image_file(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(80, 4, 4)).astype(np.uint8)
    data = tmp_path / "images.npz"
    np.savez(data, x=images)
    run_dir = tmp_path / "run"
    args = ["--batch-size", "16", "--steps", "10", "--val-every", "5", "--set", "hidden=[8]"]
    assert main(["train", "vae", "--data", str(data), "--out", str(run_dir), "--no-progress", *args]) == 0
    meta = read_json(run_dir / "last.json")["metadata"]
    assert meta["event_shape"] == [1, 4, 4] and meta["num_levels"] == 256
    npz = tmp_path / "s.npz"
    assert (
        main(["sample", str(run_dir), "--num", "9", "--out", str(tmp_path / "s.png"), "--npz", str(npz)]) == 0
    )
    with np.load(npz) as arrays:
        assert arrays["levels"].shape == (9, 1, 4, 4) and arrays["levels"].max() <= 255
    assert main(["evaluate", str(run_dir), "--num-samples", "2", "--num-generated", "20"]) == 0
    report = read_json(run_dir / "evaluation.json")
    assert report["nll"]["references_bits_per_dim"]["uniform"] == pytest.approx(8.0)
    assert report["nll"]["bits_per_dim"] == pytest.approx(report["nll"]["nats"] / (16 * np.log(2)))
    assert {"sliced_wasserstein", "mmd"} <= set(report["samples"])


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "vae" in out and "digits" in out and "eight_gaussians" in out
    for command in ("train", "sample", "evaluate", "inspect", "list"):
        assert main([command, "--help"]) == 0
        assert "usage: probgen" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "--resume" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume and safety


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(straight, "digits", "--steps", "40") == 0
    assert _train(resumed, "digits", "--steps", "20") == 0
    cmd = [
        "train",
        "vae",
        "--data",
        "digits",
        "--out",
        str(resumed),
        "--resume",
        "--steps",
        "40",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(cmd) == 0
    a, meta_a = _model_state(straight)
    b, meta_b = _model_state(resumed)
    assert meta_b["step"] == 40 and meta_b["config"] == meta_a["config"]
    assert [s for s, _ in meta_b["history"]["val"]] == [10, 20, 30, 40]  # --val-every 10 was kept
    assert meta_b["history"] == meta_a["history"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Resuming again without a larger --steps has nothing to do.
    assert main(cmd) == 2
    _assert_one_line_error(capsys, "already at step 40")


def test_refuses_to_overwrite_a_saved_run(digits_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in digits_run.iterdir()}
    assert _train(digits_run) == 2
    _assert_one_line_error(capsys, "already holds a saved run", "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in digits_run.iterdir()} == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data", "eight_gaussians"], "holds a run of 'vae' on 'digits'"),
        (["--data", "digits", "--set", "latent_dim=3"], "--set cannot change"),
        (["--data", "digits", "--batch-size", "7"], "--batch-size 7 differs from the saved run's"),
        (["--data", "digits", "--seed", "9"], "a resumed run cannot change it"),
    ],
)
def test_resume_must_match_the_saved_run(run_copy, capsys, extra, needle):
    args = ["train", "vae", *extra, "--out", str(run_copy), "--resume", "--steps", "30", "--no-progress"]
    assert main(args) == 2
    _assert_one_line_error(capsys, needle)
    assert _model_state(run_copy)[1]["step"] == 20


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    assert main(["train", "vae", "--data", "digits", "--out", str(tmp_path / "none"), "--resume"]) == 2
    _assert_one_line_error(capsys, "nothing to resume")


def test_ctrl_c_saves_last_and_exits_130(tmp_path, monkeypatch, capsys):
    real_fit = probgen.inference.fit

    def fit_interrupted_at_step_7(*args, **kwargs):
        def callback(step, loss):
            if step == 7:
                os.kill(os.getpid(), signal.SIGINT)

        return real_fit(*args, callback=callback, **kwargs)

    monkeypatch.setattr(probgen.inference, "fit", fit_interrupted_at_step_7)
    run_dir = tmp_path / "run"
    assert _train(run_dir) == 130
    err = capsys.readouterr().err
    assert f"interrupted: checkpoint saved at step 7 in {run_dir}; resume with --resume" in err
    assert _model_state(run_dir)[1]["step"] == 7
    monkeypatch.setattr(probgen.inference, "fit", real_fit)
    assert main(["train", "vae", "--data", "digits", "--out", str(run_dir), "--resume", "--no-progress"]) == 0
    assert _model_state(run_dir)[1]["step"] == 20  # the saved target, not the default 3000


def test_training_error_exits_1_and_keeps_checkpoints(run_copy, monkeypatch, capsys):
    def failing_fit(*args, **kwargs):
        raise TrainingError("Non-finite loss at step 23; model site 'x' has a non-finite log-prob.")

    monkeypatch.setattr(probgen.inference, "fit", failing_fit)
    args = ["train", "vae", "--data", "digits", "--out", str(run_copy), "--resume", "--steps", "30"]
    assert main(args) == 1
    _assert_one_line_error(capsys, "training failed: Non-finite loss at step 23")
    assert _model_state(run_copy)[1]["step"] == 20


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "nope", "--data", "digits"], "unknown method 'nope'"),
        (["train", "vae", "--data", "no_such_data"], "no_such_data"),
        (["train", "vae", "--data", "digits", "--steps", "0"], "--steps"),
        (["train", "vae", "--data", "digits", "--steps", "ten"], "--steps"),
        (["train", "vae", "--data", "digits", "--lr", "-1"], "--lr"),
        (["train", "vae", "--data", "digits", "--lr", "nan"], "--lr"),
        (["train", "vae", "--data", "digits", "--batch-size", "0"], "--batch-size"),
        (["train", "vae", "--data", "digits", "--batch-size", "5000"], "batch_size"),
        (["train", "vae", "--data", "digits", "--set", "latent_dim"], "key=value"),
        (["train", "vae", "--data", "digits", "--set", "no_such_arg=1"], "no_such_arg"),
        (["train", "vae", "--data", "digits", "--set", "likelihood=poisson"], "poisson"),
        (["train", "vae", "--data", "digits", "--device", "tpu"], "tpu"),
        (["train", "vae", "--data", "digits", "--ema-decay", "1"], "--ema-decay"),
        (["train", "vae", "--data", "digits", "--ema-decay", "0"], "--ema-decay"),
        (["train", "vae", "--data", str(Path(__file__).with_suffix(".npz"))], ".npz"),
        (["train", "vae", "--data", "digits", "--sde", "ve"], "--sde applies to score-sde only"),
        (["train", "score-sde", "--data", "moons", "--sde", "ve", "--set", "sde=vp"], "contradicts"),
        (["train", "score-sde", "--data", "moons", "--sde", "bm"], "--sde"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
)
def test_bad_training_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    if argv and argv[0] == "train":
        argv = [*argv, "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    _assert_one_line_error(capsys, needle)
    assert not out.exists()


def test_ema_decay_keeps_an_average_that_sampling_loads(tmp_path, capsys):
    run_dir = tmp_path / "ema"
    assert _train(run_dir, "eight_gaussians", "--ema-decay", "0.9") == 0
    tensors, info = load_checkpoint(run_dir, "last")
    assert info["metadata"]["fit"]["ema_decay"] == 0.9
    raw = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in raw)
    method, _ = load_method(run_dir, "last")
    for k, v in method.state_dict().items():
        assert torch.equal(v, ema[k]), k
    # A resumed run keeps the saved decay without repeating the flag.
    resume = ["train", "vae", "--data", "eight_gaussians", "--out", str(run_dir), "--resume", "--steps", "30"]
    assert main([*resume, "--no-progress", "--device", "cpu"]) == 0
    assert load_checkpoint(run_dir, "last")[1]["metadata"]["fit"]["ema_decay"] == 0.9


def test_ddpm_ddim_sampler_and_its_options(tmp_path, capsys):
    run_dir = tmp_path / "ddpm"
    argv = ["train", "ddpm", "--data", "eight_gaussians", "--out", str(run_dir), "--steps", "10"]
    tiny = [
        "--set",
        "T=20",
        "--set",
        "hidden=[16]",
        "--set",
        "embed_dim=8",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*argv, *tiny]) == 0
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    sampler = ["--sampler", "ddim", "--steps", "5", "--eta", "0.5", "--option", "spacing=quadratic"]
    assert main(["sample", str(run_dir), "--num", "50", "--out", str(png), "--npz", str(npz), *sampler]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert main(["evaluate", str(run_dir), "--num-samples", "1", "--num-generated", "64", *sampler]) == 0
    report = read_json(run_dir / "evaluation.json")["samples"]
    assert report["sampler"] == "ddim" and report["sampler_steps"] == 5 and report["eta"] == 0.5
    assert report["sampler_options"] == {"spacing": "quadratic"}
    capsys.readouterr()
    bad = ["sample", str(run_dir), "--num", "5", "--out", str(png), "--sampler", "ddim", "--steps", "5"]
    assert main([*bad, "--option", "spacing=cubic"]) == 2
    _assert_one_line_error(capsys, "spacing")
    assert main([*bad, "--option", "colour=red"]) == 2
    _assert_one_line_error(capsys, "colour")


def test_gan_trains_samples_and_evaluates_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "gan"
    argv = [
        "train",
        "gan",
        "--data",
        "eight_gaussians",
        "--out",
        str(run_dir),
        "--steps",
        "20",
        "--val-every",
        "10",
    ]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    assert "best validation loss" in capsys.readouterr().out
    assert (run_dir / "loss.png").read_bytes().startswith(PNG_MAGIC)
    png = tmp_path / "gan.png"
    assert main(["sample", str(run_dir), "--num", "100", "--out", str(png)]) == 0
    assert main(["evaluate", str(run_dir), "--num-generated", "200"]) == 0
    report = read_json(run_dir / "evaluation.json")
    assert report["nll"]["nats"] is None and "mode_coverage" in report["samples"]
    capsys.readouterr()
    assert main(["inspect", str(run_dir)]) == 0  # no guide: the generative program's trace
    assert "model (generative)" in capsys.readouterr().out


def test_ncsn_trains_and_samples_by_annealed_langevin(tmp_path, capsys):
    run_dir = tmp_path / "ncsn"
    argv = ["train", "ncsn", "--data", "eight_gaussians", "--out", str(run_dir), "--steps", "20"]
    assert main([*argv, "--val-every", "10", "--no-progress", "--device", "cpu"]) == 0
    png, npz = tmp_path / "ncsn.png", tmp_path / "ncsn.npz"
    sample = ["sample", str(run_dir), "--num", "50", "--out", str(png), "--npz", str(npz)]
    assert main([*sample, "--sampler", "annealed-langevin", "--steps", "3"]) == 0  # steps per level
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert np.load(npz)["samples"].shape == (50, 2)
    capsys.readouterr()
    assert main([*sample, "--sampler", "ode"]) == 2
    _assert_one_line_error(capsys, "annealed-langevin")
    assert main([*sample, "--sampler", "annealed-langevin", "--option", "step_size=0"]) == 2
    _assert_one_line_error(capsys, "step")


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_score_sde_trains_and_samples_with_every_sampler(tmp_path, capsys, sde):
    run_dir = tmp_path / sde
    argv = ["train", "score-sde", "--sde", sde, "--data", "moons", "--out", str(run_dir), "--steps", "20"]
    assert main([*argv, "--val-every", "10", "--no-progress", "--device", "cpu"]) == 0
    assert read_json(run_dir / "last.json")["metadata"]["config"]["sde"] == sde
    png = tmp_path / "s.png"
    for sampler in ("em", "pc", "ode"):
        steps = ["--steps", "50"] if sampler != "ode" else ["--option", "solver=euler", "--steps", "10"]
        sample = ["sample", str(run_dir), "--num", "20", "--out", str(png), "--sampler", sampler]
        assert main([*sample, *steps]) == 0
    # `probgen evaluate` on these untrained runs would integrate a stiff ODE for minutes; its
    # estimator is tested in tests/inference/test_score_sde_sampling.py.


@pytest.mark.parametrize("command", ["sample", "evaluate", "inspect"])
def test_missing_run_dir_exits_2(tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "s.png")] if command == "sample" else []
    assert main([command, str(tmp_path / "missing"), *extra]) == 2
    _assert_one_line_error(capsys, "missing")
    assert main([command, str(tmp_path), *extra]) == 2
    _assert_one_line_error(capsys, "not a probgen run directory")


@pytest.mark.parametrize("command", ["sample", "evaluate", "inspect"])
def test_corrupt_run_dir_exits_2(run_copy, tmp_path, capsys, command):
    (run_copy / "best.json").unlink()
    (run_copy / "last.json").write_text("{ this is not json")
    extra = ["--out", str(tmp_path / "s.png")] if command == "sample" else []
    assert main([command, str(run_copy), *extra]) == 2
    _assert_one_line_error(capsys, "last.json")
    assert main(["train", "vae", "--data", "digits", "--out", str(run_copy), "--resume"]) == 2
    _assert_one_line_error(capsys, "invalid JSON")
    assert not (tmp_path / "s.png").exists()


def _rewrite_metadata(run_dir, reseal=True, **changes):
    """Edit the metadata of both checkpoints; ``reseal``: recompute the record digest as a forger
    would, so that what is tested is the check behind it."""
    from probgen.checkpoint import _record_digest

    for tag in ("best", "last"):
        info = read_json(run_dir / f"{tag}.json")
        info["metadata"].update(changes)
        if reseal:
            info["record_sha256"] = _record_digest(info)
        (run_dir / f"{tag}.json").write_text(json.dumps(info))


def test_an_edited_run_directory_exits_2(run_copy, tmp_path, capsys):
    _rewrite_metadata(run_copy, reseal=False, step=5)
    assert main(["sample", str(run_copy), "--out", str(tmp_path / "s.png")]) == 2
    _assert_one_line_error(capsys, "does not match its record_sha256")


def test_run_of_another_method_exits_2(run_copy, tmp_path, capsys):
    _rewrite_metadata(run_copy, method="flow_matching")
    assert main(["sample", str(run_copy), "--out", str(tmp_path / "s.png")]) == 2
    _assert_one_line_error(capsys, "'flow_matching'")
    assert main(["evaluate", str(run_copy)]) == 2
    _assert_one_line_error(capsys, "'flow_matching'")
    assert (
        main(["train", "vae", "--data", "digits", "--out", str(run_copy), "--resume", "--steps", "30"]) == 2
    )
    _assert_one_line_error(capsys, "holds a run of 'flow_matching'")


# ----------------------------------------------------------------------------- load_method


def test_load_method_round_trip_and_tags(digits_run):
    method, meta = load_method(digits_run)
    assert isinstance(method, VAE) and not method.training and meta["tag"] == "best"
    best, _ = _model_state(digits_run, "best")
    assert all(torch.equal(v, best[f"model.{k}"]) for k, v in method.state_dict().items())
    last_method, last_meta = load_method(digits_run, "last")
    assert last_meta["tag"] == "last" and last_meta["step"] == 20


def test_load_method_errors(run_copy, tmp_path):
    from probgen.checkpoint import _record_digest

    config = read_json(run_copy / "best.json")["metadata"]["config"]
    with pytest.raises(CheckpointError, match="no checkpoint 'nope'"):
        load_method(run_copy, "nope")
    _rewrite_metadata(
        run_copy, config={**read_json(run_copy / "best.json")["metadata"]["config"], "latent_dim": 3}
    )
    with pytest.raises(CheckpointError, match="do not fit") as excinfo:
        load_method(run_copy)
    assert "shape" in str(excinfo.value)
    _rewrite_metadata(run_copy, config={"data_dim": 64, "no_such_arg": 1})
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        load_method(run_copy)
    info = read_json(run_copy / "best.json")
    del info["metadata"]["config"]
    info["record_sha256"] = _record_digest(info)
    (run_copy / "best.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="'config'"):
        load_method(run_copy)
    # Sizes are checked before anything is allocated: a crafted config cannot exhaust memory.
    _rewrite_metadata(run_copy, config={**config, "hidden": [10**12]})
    with pytest.raises(CheckpointError, match=r"Expected hidden\[0\] <= 1e\+07"):
        load_method(run_copy)
    _rewrite_metadata(run_copy, config={**config, "hidden": [60000, 60000]})
    with pytest.raises(CheckpointError, match=r"Expected at most 1e\+09 parameters"):
        load_method(run_copy)


def test_state_that_does_not_fit_is_a_one_line_cli_error(run_copy, tmp_path, capsys):
    config = read_json(run_copy / "best.json")["metadata"]["config"]
    _rewrite_metadata(run_copy, config={**config, "hidden": [32]})
    assert main(["inspect", str(run_copy)]) == 2
    _assert_one_line_error(capsys, "do not fit")


# ----------------------------------------------------------------------------- installed command


def test_module_and_console_script_run():
    done = subprocess.run(
        [sys.executable, "-m", "probgen.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "train" in done.stdout and "evaluate" in done.stdout
    script = shutil.which("probgen", path=os.path.dirname(sys.executable))
    assert script is not None, "the probgen console script is not installed next to the interpreter"
    done = subprocess.run(
        [script, "train", "vae", "--data", "digits"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("probgen: error: ") and "--out" in done.stderr
    assert "Traceback" not in done.stderr


def test_compare_quick_and_zero_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", "moons", "--methods", "vae,flow", "--quick", "--out", str(out)]
    argv.append("--no-progress")
    assert main(argv) == 0
    assert (out / "compare.md").is_file() and (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert main(["compare", "--data", "moons", "--steps", "0", "--out", str(out)]) == 2
    _assert_one_line_error(capsys, "Expected a positive budget")
