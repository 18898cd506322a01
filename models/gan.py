r"""Generative adversarial network as a pair of Pyro programs.

Goodfellow et al. 2014, "Generative Adversarial Nets" (arXiv:1406.2661).

The **generator** is a generative program with a latent sample site and a deterministic
observation site, so ``pyro.infer.Predictive`` (or :meth:`GAN.sample`) samples it:

.. math::
    z \sim \mathcal N(0, I), \qquad x = G_\theta(z).

The **discriminator** is a likelihood over a Bernoulli label site ``"real"``:
:math:`\text{real} \mid x \sim \mathrm{Bernoulli}(\sigma(D_\psi(x)))`, with :math:`D_\psi`
returning logits. Each player's objective is the log-probability of that site in a trace of
:meth:`GAN.discriminator_program`, observed at the label the player wants:

* the discriminator maximizes
  :math:`\mathbb E_{p_\text{data}} \log \mathrm{Bern}(1 \mid \sigma(D(x))) +
  \mathbb E_z \log \mathrm{Bern}(0 \mid \sigma(D(G(z))))` (eq. 1 of the paper), with the
  generated batch held fixed;
* the generator maximizes the non-saturating :math:`\mathbb E_z \log \mathrm{Bern}(1 \mid
  \sigma(D(G(z))))` (section 3 of the paper), with the discriminator held fixed.

With ``r1_gamma > 0`` the discriminator program on real data also carries
``pyro.factor("r1", -gamma / 2 * ||grad_x D(x)||^2)``, the R1 gradient penalty of
Mescheder, Geiger & Nowozin 2018, "Which Training Methods for GANs do actually Converge?"
(arXiv:1801.04406), on the logits.

A GAN has no variational guide and no ELBO: :meth:`GAN.guide` and :meth:`GAN.elbo` raise.
Its objective (:meth:`GAN.objective`, an :class:`AdversarialObjective` that
:func:`probgen.inference.fit` drives) has two players, each with its own Adam optimizer, and reads
both losses from traces of these programs (Goodfellow et al. 2014, Algorithm 1, with the
non-saturating generator loss):

* :func:`discriminator_loss`: minus the log-probability of the traces of the discriminator
  program on a real batch observed at ``real=True`` (with the R1 factor) and on a generated
  batch, taken as a constant, at ``real=False``;
* :func:`generator_loss`: minus the log-probability of the trace of the discriminator program,
  its parameters frozen, on a batch traced through the generator program, at ``real=True``.

Both are scaled by ``poutine.scale(1 / B)`` so they read in nats per example. The training options
(``d_steps``, ``r1_gamma``, Adam's ``betas``, the players' learning rates) are part of the config,
so ``probgen train gan --set r1_gamma=0.1`` sets them and a run directory records them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn

from probgen.metrics import sliced_wasserstein
from probgen.models.base import Method, register
from probgen.nets import MLP
from probgen.objectives import Objective, Player, seeded, trace_log_prob

__all__ = [
    "GAN",
    "OUTPUTS",
    "AdversarialObjective",
    "discriminator_loss",
    "generated_batch",
    "generator_loss",
]

OUTPUTS = ("identity", "tanh")

_NO_GUIDE = (
    "a GAN has no variational guide or ELBO: it is trained by probgen.inference.fit over "
    "GAN.objective() (probgen train gan), which reads both players' losses from traces of "
    "GAN.model and GAN.discriminator_program"
)


@register("gan")
class GAN(Method):
    r"""GAN: an MLP generator program and an MLP discriminator likelihood.

    Args:
        data_dim: flat size D of one observation.
        event_shape: shape of one observation (default ``(D,)``); images are generated flat.
        latent_dim: size of :math:`z`.
        generator_hidden: hidden widths of the generator MLP.
        discriminator_hidden: hidden widths of the discriminator MLP (``()``: a linear
            discriminator).
        activation: activation of both MLPs (see :class:`probgen.nets.MLP`).
        output: the generator's last nonlinearity: ``"identity"`` for real vectors,
            ``"tanh"`` for data in ``[-1, 1]`` (the ``"centered"`` digits).
        d_steps: discriminator updates per generator update (k in Algorithm 1).
        r1_gamma: :math:`\gamma` of the R1 penalty (0: none).
        betas: Adam's betas of both players; (0.5, 0.999) as in DCGAN (Radford et al. 2015,
            arXiv:1511.06434), (0.0, 0.9) is common with a gradient penalty.
        lr_generator, lr_discriminator: the players' learning rates (None: ``fit``'s ``lr``).

    Example:
        >>> gan = GAN(2, latent_dim=8)
        >>> x = gan.sample(16)                                                  # (16, 2)
        >>> pyro.infer.Predictive(gan.model, num_samples=3)(batch_size=16)["x"].shape
        torch.Size([3, 16, 2])
        >>> fake = poutine.trace(gan.model).get_trace(batch_size=16).nodes["x"]["value"]
        >>> trace = poutine.trace(gan.discriminator_program).get_trace(fake, True)
        >>> trace.log_prob_sum() / 16      # the generator's objective on this batch (nats)
    """

    likelihoods = {}

    def __init__(
        self,
        data_dim: int,
        *,
        event_shape: Sequence[int] | None = None,
        latent_dim: int = 8,
        generator_hidden: Sequence[int] = (128, 128, 128),
        discriminator_hidden: Sequence[int] = (128, 128, 128),
        activation: str = "relu",
        output: str = "identity",
        d_steps: int = 1,
        r1_gamma: float = 0.0,
        betas: Sequence[float] = (0.5, 0.999),
        lr_generator: float | None = None,
        lr_discriminator: float | None = None,
    ) -> None:
        super().__init__()
        _check_training_options(d_steps, r1_gamma, betas, lr_generator, lr_discriminator)
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} >= 1 (an int), but found {value!r}.")
        if output not in OUTPUTS:
            raise ValueError(f"Expected output in {OUTPUTS}, but found {output!r}.")
        event_shape = (data_dim,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != data_dim:
            raise ValueError(
                f"Expected an event_shape with {data_dim} elements, but found {event_shape} "
                f"({math.prod(event_shape)} elements)."
            )
        self.config = dict(
            data_dim=data_dim,
            event_shape=list(event_shape),
            latent_dim=latent_dim,
            generator_hidden=list(generator_hidden),
            discriminator_hidden=list(discriminator_hidden),
            activation=activation,
            output=output,
            d_steps=d_steps,
            r1_gamma=float(r1_gamma),
            betas=[float(b) for b in betas],
            lr_generator=lr_generator,
            lr_discriminator=lr_discriminator,
        )
        self.data_dim, self.event_shape = data_dim, event_shape
        self.latent_dim, self.output = latent_dim, output
        self.generator = MLP(latent_dim, data_dim, generator_hidden, activation=activation)
        self.discriminator = MLP(data_dim, 1, discriminator_hidden, activation=activation)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype

    # ------------------------------------------------------------------ protocol

    @classmethod
    def data_form(cls, dataset_name: str) -> str:
        """Digits in ``[-1, 1]`` (``"centered"``, for the tanh output); raw values otherwise."""
        return "centered" if dataset_name == "digits" else "int"

    @classmethod
    def from_data(cls, dataset: Any, **kwargs: Any) -> GAN:
        """A GAN for ``dataset``: a tanh output for images in ``[-1, 1]``, identity otherwise."""
        x = dataset.x
        defaults: dict[str, Any] = {"data_dim": x.shape[-1], "event_shape": list(dataset.event_shape)}
        if dataset.kind == "image" and x.numel() and float(x.min()) >= -1 and float(x.max()) <= 1:
            defaults.update(
                output="tanh", latent_dim=16, generator_hidden=(256, 256), discriminator_hidden=(256, 256)
            )
        defaults.update(kwargs)
        return cls(**defaults)

    def objective(self) -> AdversarialObjective:
        """The two-player objective of Algorithm 1 with this GAN's training options."""
        return AdversarialObjective(self)

    def elbo(self) -> ELBO:
        """Not available: a GAN is not trained by an ELBO (see the module docstring)."""
        raise NotImplementedError(_NO_GUIDE)

    def guide(self, x: Tensor | None = None, batch_size: int | None = None) -> None:
        """Not available: a GAN has no variational guide (see the module docstring)."""
        raise NotImplementedError(_NO_GUIDE)

    # ------------------------------------------------------------------ networks

    def generate(self, z: Tensor) -> Tensor:
        r""":math:`G_\theta(z)`: latents ``(..., latent_dim)`` to observations ``(..., D)``."""
        out = self.generator(z)
        return torch.tanh(out) if self.output == "tanh" else out

    def discriminate(self, x: Tensor) -> Tensor:
        r""":math:`D_\psi(x)`, the logit of :math:`p(\text{real} \mid x)`: ``x`` ``(..., D)`` to ``(...)``."""
        if x.shape[-1] != self.data_dim:
            raise ValueError(f"Expected x of shape (..., {self.data_dim}), but found {tuple(x.shape)}.")
        return self.discriminator(x.to(self._anchor.dtype)).squeeze(-1)

    # ------------------------------------------------------------------ programs

    def model(self, x: Tensor | None = None, batch_size: int | None = None) -> Tensor:
        r"""The generator program: ``"z"`` :math:`\sim \mathcal N(0, I)`, ``"x"`` :math:`= G(z)`.

        Args:
            x: must be None: the generator has no likelihood to score data with (the
                discriminator program scores data).
            batch_size: number B of samples (default 1).

        Returns:
            The value of the deterministic site ``"x"``, ``(B, D)``.
        """
        if x is not None:
            raise ValueError(
                "Expected x=None (the generator program only samples), but found observations; "
                "data enter a GAN through GAN.discriminator_program."
            )
        n = self._batch_size(None, batch_size)
        with pyro.plate("data", n):
            prior = dist.Normal(self._anchor.new_zeros(self.latent_dim), 1.0)
            z = pyro.sample("z", prior.to_event(1))
            return pyro.deterministic("x", self.generate(z), event_dim=1)

    def discriminator_program(self, x: Tensor, real: bool, *, r1_gamma: float = 0.0) -> Tensor:
        r"""The discriminator as a likelihood: ``"real"`` :math:`\sim \mathrm{Bern}(\sigma(D(x)))`, observed.

        The log-probability of the site ``"real"`` in a trace of this program is
        :math:`\log \sigma(D(x))` per example when ``real`` is True and
        :math:`\log(1 - \sigma(D(x)))` when it is False. With ``r1_gamma > 0`` the program
        also has ``pyro.factor("r1", ...)`` with log-factor
        :math:`-\tfrac{\gamma}{2} \lVert \nabla_x D(x) \rVert^2` per example (R1 when ``x``
        is real data), kept differentiable in the discriminator's parameters.

        Args:
            x: observations ``(B, D)``.
            real: the observed label of every example.
            r1_gamma: :math:`\gamma \ge 0` of the gradient penalty (0: no ``"r1"`` site).

        Returns:
            The logits :math:`D(x)`, ``(B,)``.
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.data_dim:
            found = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected x of shape (B, {self.data_dim}), but found {found}.")
        if not isinstance(real, bool):
            raise ValueError(f"Expected the label real to be a bool, but found {real!r}.")
        if isinstance(r1_gamma, bool) or not isinstance(r1_gamma, (int, float)) or not r1_gamma >= 0:
            raise ValueError(f"Expected r1_gamma >= 0, but found {r1_gamma!r}.")
        n = x.shape[0]
        # The penalty differentiates D with respect to x, also when the caller is under no_grad.
        with torch.enable_grad() if r1_gamma else contextlib.nullcontext():
            if r1_gamma:
                x = x.detach().requires_grad_(True)
            logits = self.discriminate(x)
            with pyro.plate("data", n):
                label = logits.new_full((n,), float(real))
                pyro.sample("real", dist.Bernoulli(logits=logits), obs=label)
                if r1_gamma:
                    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
                    pyro.factor("r1", -0.5 * float(r1_gamma) * grad.pow(2).sum(-1))
        return logits


def _check_training_options(d_steps, r1_gamma, betas, lr_generator, lr_discriminator) -> None:
    if isinstance(d_steps, bool) or not isinstance(d_steps, int) or d_steps < 1:
        raise ValueError(f"Expected d_steps to be a positive integer, but found {d_steps!r}.")
    if isinstance(r1_gamma, bool) or not isinstance(r1_gamma, (int, float)) or not r1_gamma >= 0:
        raise ValueError(f"Expected r1_gamma >= 0, but found {r1_gamma!r}.")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"Expected betas as two numbers in [0, 1), but found {betas!r}.")
    for name, value in (("lr_generator", lr_generator), ("lr_discriminator", lr_discriminator)):
        if value is not None and not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            raise ValueError(f"Expected a positive finite {name} or None, but found {value!r}.")


# ----------------------------------------------------------------------------- objective


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Hold ``module``'s parameters constant inside the block (no gradient reaches them)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def generated_batch(gan: GAN, batch_size: int, *, z: Tensor | None = None) -> Tensor:
    r"""Trace the generator program and return its site ``"x"``, ``(B, D)``.

    Args:
        gan: a GAN.
        batch_size: B.
        z: latents ``(B, latent_dim)`` to condition the site ``"z"`` on (default: sampled).
    """
    program = gan.model if z is None else poutine.condition(gan.model, data={"z": z})
    return poutine.trace(program).get_trace(None, batch_size=batch_size).nodes["x"]["value"]


def discriminator_loss(gan: GAN, x_real: Tensor, x_fake: Tensor, *, r1_gamma: float = 0.0) -> Tensor:
    r"""The discriminator's loss in nats per example, read from traces of its program.

    .. math::
        -\tfrac{1}{B}\sum_i \log \mathrm{Bern}(1 \mid \sigma(D(x_i))) - \tfrac{1}{B'}\sum_j
        \log \mathrm{Bern}(0 \mid \sigma(D(\tilde x_j))) + \tfrac{\gamma}{2B}\sum_i
        \lVert \nabla_x D(x_i) \rVert^2

    Args:
        gan: a GAN.
        x_real: data ``(B, D)``.
        x_fake: generated samples ``(B', D)``; detached, so no gradient reaches the generator.
        r1_gamma: :math:`\gamma` of the R1 penalty on the real batch.

    Returns:
        A scalar tensor; its gradient reaches the discriminator's parameters only.
    """
    real = trace_log_prob(gan.discriminator_program, x_real.shape[0], x_real, True, r1_gamma=r1_gamma)
    fake = trace_log_prob(gan.discriminator_program, x_fake.shape[0], x_fake.detach(), False)
    return -(real + fake)


def generator_loss(gan: GAN, batch_size: int, *, z: Tensor | None = None) -> Tensor:
    r"""The generator's non-saturating loss in nats per example, read from traces.

    A batch is traced through the generator program and scored by the discriminator program
    at ``real=True`` with the discriminator's parameters frozen:
    :math:`-\tfrac{1}{B}\sum_j \log \mathrm{Bern}(1 \mid \sigma(D(G(z_j))))`.

    Args:
        gan: a GAN.
        batch_size: B.
        z: latents ``(B, latent_dim)`` to condition the generator program on (default: sampled).

    Returns:
        A scalar tensor; its gradient reaches the generator's parameters only.
    """
    x_fake = generated_batch(gan, batch_size, z=z)
    with _frozen(gan.discriminator):
        return -trace_log_prob(gan.discriminator_program, batch_size, x_fake, True)


class AdversarialObjective(Objective):
    r"""The GAN's two players (Goodfellow et al. 2014, Algorithm 1), for :func:`probgen.inference.fit`.

    Each step makes ``d_steps`` discriminator updates (each on a fresh data minibatch and a fresh
    generated batch of the same size, :func:`discriminator_loss`), then one generator update
    (:func:`generator_loss`); each player has its own Adam optimizer with the GAN's ``betas`` and
    learning rate. The default validation score is the sliced Wasserstein-2 distance between up to
    2,000 generated points (common random numbers) and the validation data.
    """

    val_metric = "sliced Wasserstein-2 to the validation data"

    def __init__(self, gan: GAN) -> None:
        super().__init__(gan)
        cfg = gan.config
        self.d_steps, self.r1_gamma = int(cfg.get("d_steps", 1)), float(cfg.get("r1_gamma", 0.0))
        self.betas = tuple(cfg.get("betas", (0.5, 0.999)))
        self.batches_per_step = self.d_steps

    def players(self) -> dict[str, Player]:
        cfg = self.method.config
        return {
            "discriminator": Player(list(self.method.discriminator.parameters()), cfg.get("lr_discriminator"),
                                    self.betas),
            "generator": Player(
                list(self.method.generator.parameters()), cfg.get("lr_generator"), self.betas
            ),
        }  # fmt: skip

    def losses(self, batch: Callable[[int], Tensor], step: int, steps: int) -> Iterator[tuple[str, Tensor]]:
        gan = self.method
        for k in range(self.d_steps):
            x = batch(k)
            with torch.no_grad():
                x_fake = generated_batch(gan, x.shape[0])
            yield "discriminator", discriminator_loss(gan, x, x_fake, r1_gamma=self.r1_gamma)
        yield "generator", generator_loss(gan, x.shape[0])

    def validate(self, val: Tensor, seed: int) -> float:
        num = min(val.shape[0], 2000)
        with torch.no_grad(), seeded(seed, val):
            x = generated_batch(self.method, num)
        return sliced_wasserstein(x.cpu(), val[:num].cpu())

    def diagnose(self, player: str, x: Tensor | None) -> str | None:
        return super().diagnose(player, x if player == "discriminator" else None)

    def settings(self) -> dict[str, Any]:
        return {"objective": type(self).__name__, "d_steps": self.d_steps, "r1_gamma": self.r1_gamma,
                "betas": list(self.betas)}  # fmt: skip
