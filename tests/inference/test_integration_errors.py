"""Non-finite values met while integrating stop every sampler with one error that names the time."""

from __future__ import annotations

import pytest
import torch

from probgen.inference.ode import ode_log_likelihood, ode_sample
from probgen.inference.sde import pc_sample, reverse_sde_sample
from probgen.sdes import VPSDE, IntegrationError


def blows_up_below(t_bad: float):
    """A score of N(0, I) data that returns NaN once the forward time drops below ``t_bad``."""

    def score(x, t):
        s = -x
        return torch.where((t < t_bad)[:, None], torch.full_like(s, float("nan")), s)

    return score


@pytest.mark.parametrize(
    "run",
    [
        lambda sde, score, x: reverse_sde_sample(sde, score, x, steps=20),
        lambda sde, score, x: pc_sample(sde, score, x, steps=50),
        lambda sde, score, x: ode_sample(sde, score, x, method="euler", steps=20),
        lambda sde, score, x: ode_sample(sde, score, x),
    ],
    ids=["sdeint", "pc", "ode-euler", "ode-dopri5"],
)
def test_samplers_stop_at_the_first_non_finite_score_and_name_its_time(run):
    sde = VPSDE()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(IntegrationError, match=r"non-finite .* at t = 0\.4"):
        run(sde, blows_up_below(0.5), x)


def test_ode_likelihood_stops_at_the_first_non_finite_score():
    def score(x, t):  # fine near the data, NaN from t = 0.5 on (the likelihood integrates eps -> T)
        return torch.where((t > 0.5)[:, None], torch.full_like(x, float("nan")), -x)

    with pytest.raises(IntegrationError, match=r"at t = 0\.5"):
        ode_log_likelihood(VPSDE(), score, torch.zeros(3, 2), method="euler", steps=20)


def test_finite_runs_are_unchanged():
    sde = VPSDE()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ode_sample(sde, lambda x, t: -x, x, method="euler", steps=10)).all()


def test_a_stiff_flow_stops_the_adaptive_solver_with_a_clear_error(monkeypatch):
    import probgen.inference.ode as ode_module

    monkeypatch.setattr(ode_module, "MAX_ADAPTIVE_STEPS", 5)

    def stiff(x, t):  # a score whose size forces dopri5 into tiny steps
        return -1e4 * x

    with pytest.raises(IntegrationError, match="within 5 steps"):
        ode_sample(VPSDE(), stiff, torch.ones(2, 2))
