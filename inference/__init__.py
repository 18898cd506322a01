"""Algorithms that take probabilistic programs, score functions and SDEs."""

from probgen.inference.ancestral import ancestral_sample, ddim_sample, ddim_timesteps
from probgen.inference.conditioning import ScoreSDEDistribution, inpaint
from probgen.inference.consistency import (
    consistency_distillation_loss,
    consistency_training_loss,
    pf_ode_step,
    sample_consistency,
)
from probgen.inference.discrete_langevin import DMALA, DULA, DiscreteLangevin, dlp_proposal
from probgen.inference.distill import (
    DistillResult,
    grid_ddim_sample,
    halving_schedule,
    load_teacher,
    progressive_distill,
)
from probgen.inference.langevin import (
    annealed_langevin,
    check_sigmas,
    langevin_corrector,
    langevin_sde_sample,
)
from probgen.inference.likelihood import (
    ddpm_bits_per_dim,
    ddpm_nll,
    iwae_bits_per_dim,
    iwae_log_likelihood,
    log_likelihood,
)
from probgen.inference.mcmc import MALA, SGLD, ULA, KineticLangevin, LangevinKernel
from probgen.inference.ode import LogDensityODE, ode_bits_per_dim, ode_encode, ode_log_likelihood, ode_sample
from probgen.inference.score_sde_sampling import ode_likelihood, sample_score_sde
from probgen.inference.sde import (
    euler_maruyama_predictor,
    pc_sample,
    reverse_diffusion_predictor,
    reverse_sde_sample,
    tweedie_denoise,
)
from probgen.inference.traces import TraceReport, inspect_trace
from probgen.inference.train import FitResult, TrainingError, fit, run_record
from probgen.models.gan import discriminator_loss, generated_batch, generator_loss
from probgen.objectives import ELBOObjective, Objective, Player, elbo_per_example

__all__ = [
    "DistillResult",
    "grid_ddim_sample",
    "halving_schedule",
    "load_teacher",
    "progressive_distill",
    "consistency_distillation_loss",
    "consistency_training_loss",
    "pf_ode_step",
    "sample_consistency",
    "LogDensityODE",
    "ScoreSDEDistribution",
    "euler_maruyama_predictor",
    "inpaint",
    "ode_bits_per_dim",
    "ode_encode",
    "ode_likelihood",
    "ode_log_likelihood",
    "ode_sample",
    "pc_sample",
    "reverse_diffusion_predictor",
    "reverse_sde_sample",
    "sample_score_sde",
    "tweedie_denoise",
    "discriminator_loss",
    "generated_batch",
    "generator_loss",
    "annealed_langevin",
    "check_sigmas",
    "langevin_corrector",
    "langevin_sde_sample",
    "DMALA",
    "DULA",
    "DiscreteLangevin",
    "KineticLangevin",
    "LangevinKernel",
    "MALA",
    "SGLD",
    "ULA",
    "dlp_proposal",
    "ELBOObjective",
    "FitResult",
    "Objective",
    "Player",
    "run_record",
    "TraceReport",
    "TrainingError",
    "ancestral_sample",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_bits_per_dim",
    "ddpm_nll",
    "elbo_per_example",
    "log_likelihood",
    "fit",
    "inspect_trace",
    "iwae_bits_per_dim",
    "iwae_log_likelihood",
]
