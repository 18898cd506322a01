import math

import pytest
import torch
import torchsde

from probgen.sdes import LangevinSDE, batch_times


def test_langevin_sde_is_a_diagonal_ito_sde_with_the_score_as_drift():
    seen = {}

    def score(x, t):
        seen["t"] = t
        return -2.0 * x

    sde = LangevinSDE(score, temperature=0.5)
    assert isinstance(sde, torchsde.SDEIto) and sde.noise_type == "diagonal" and sde.sde_type == "ito"
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sde.f(torch.tensor(0.25), y), -2.0 * y)
    assert seen["t"].shape == (5,) and bool((seen["t"] == 0.25).all())
    torch.testing.assert_close(sde.g(0.25, y), torch.full_like(y, math.sqrt(2 * 0.5)))


def test_euler_maruyama_through_sdeint_is_one_ula_step():
    sde = LangevinSDE(lambda x, t: -x)
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=0.1, size=(4, 2), dtype=torch.float64, entropy=7)
    ts = torch.tensor([0.0, 0.1], dtype=torch.float64)
    ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.1)
    torch.testing.assert_close(ys[-1], y0 - 0.1 * y0 + math.sqrt(2) * bm(0.0, 0.1))


def test_validation():
    with pytest.raises(ValueError, match="Expected temperature > 0"):
        LangevinSDE(lambda x, t: -x, temperature=0.0)
    with pytest.raises(ValueError, match="Expected a callable"):
        LangevinSDE(3.0)
    with pytest.raises(ValueError, match="Expected a time of shape"):
        batch_times(torch.zeros(3), torch.zeros(4, 2))
    assert batch_times(0.5, torch.zeros(4, 2)).shape == (4,)
