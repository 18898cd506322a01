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
It is trained by :func:`probgen.inference.adversarial.fit_adversarial`, which reads both
objectives from traces of these programs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO
from torch import Tensor

from probgen.models.base import Method, register
from probgen.nets import MLP

__all__ = ["GAN", "OUTPUTS"]

OUTPUTS = ("identity", "tanh")

_NO_GUIDE = (
    "a GAN has no variational guide or ELBO: it is trained by "
    "probgen.inference.adversarial.fit_adversarial (probgen train gan), which reads both players' "
    "objectives from traces of GAN.model and GAN.discriminator_program"
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

    Example:
        >>> gan = GAN(2, latent_dim=8)
        >>> x = gan.sample(16)                                                  # (16, 2)
        >>> pyro.infer.Predictive(gan.model, num_samples=3)(batch_size=16)["x"].shape
        torch.Size([3, 16, 2])
        >>> fake = poutine.trace(gan.model).get_trace(batch_size=16).nodes["x"]["value"]
        >>> trace = poutine.trace(gan.discriminator_program).get_trace(fake, True)
        >>> trace.log_prob_sum() / 16      # the generator's objective on this batch (nats)
    """

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
    ) -> None:
        super().__init__()
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
        )
        self.data_dim, self.event_shape = data_dim, event_shape
        self.latent_dim, self.output = latent_dim, output
        self.generator = MLP(latent_dim, data_dim, generator_hidden, activation=activation)
        self.discriminator = MLP(data_dim, 1, discriminator_hidden, activation=activation)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device and dtype

    # ------------------------------------------------------------------ protocol

    @property
    def event_dim(self) -> int:
        return self.data_dim

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
