"""The distribution installs one namespace: probgen, probgen.models, probgen.inference."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_one_namespace_from_the_installed_package():
    import probgen.inference
    import probgen.models

    assert Path(probgen.models.__file__).parent == ROOT / "models"
    assert Path(probgen.inference.__file__).parent == ROOT / "inference"
    assert "vae" in probgen.models.available()


def test_import_has_no_global_side_effects():
    code = (
        "import torch, torch.distributions as D;"
        "v = D.Distribution._validate_args; s = torch.random.get_rng_state();"
        "dt = torch.get_default_dtype();"
        "import probgen, probgen.models, probgen.inference, probgen.cli;"
        "assert D.Distribution._validate_args == v;"
        "assert torch.equal(torch.random.get_rng_state(), s);"
        "assert torch.get_default_dtype() == dt"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_wheel_contains_all_three_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("probgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "probgen/__init__.py",
        "probgen/models/__init__.py",
        "probgen/models/vae.py",
        "probgen/inference/__init__.py",
        "probgen/inference/train.py",
        "probgen/cli.py",
        "probgen/apps/cli.py",
    ):
        assert required in names, required
    assert not any(n.startswith(("models/", "inference/", "tests/")) for n in names)
