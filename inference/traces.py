r"""Trace tables: what a model/guide pair does to one batch, site by site.

:func:`inspect_trace` runs the guide on a batch, replays the model against it
and reports every site (distribution, batch and event shapes, whether it is
observed, the sum of its log-probabilities) together with the parts of the
ELBO: :math:`\log p(x \mid z)`, :math:`\log p(z)`, :math:`\log q(z \mid x)`,
the analytic KL where one exists, and the ELBO itself, all per example. Log-probs
and KLs carry their sites' ``poutine.scale`` and ``poutine.mask`` exactly as the ELBO
does, so for a method trained on a reweighted estimator (DDPM) the parts are those of
its training objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from torch import nn

from probgen.elbo import sample_sites
from probgen.objectives import seeded

__all__ = ["SiteRow", "TraceReport", "inspect_trace"]


@dataclass(frozen=True)
class SiteRow:
    """One row of a trace table."""

    program: str
    name: str
    kind: str
    distribution: str
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    log_prob_sum: float | None


@dataclass
class TraceReport:
    """Rows for the model and guide sites and the ELBO's parts (nats per example)."""

    method: str
    batch_size: int
    rows: list[SiteRow] = field(default_factory=list)
    elbo_parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "method": self.method,
            "batch_size": self.batch_size,
            "sites": [
                {
                    **row.__dict__,
                    "batch_shape": list(row.batch_shape),
                    "event_shape": list(row.event_shape),
                    "value_shape": list(row.value_shape),
                }
                for row in self.rows
            ],
            "elbo_parts_per_example": self.elbo_parts,
        }

    def __str__(self) -> str:
        header = ("program", "site", "kind", "distribution", "batch", "event", "log-prob sum")
        body = [
            (
                r.program,
                r.name,
                r.kind,
                r.distribution,
                _shape(r.batch_shape),
                _shape(r.event_shape),
                "" if r.log_prob_sum is None else f"{r.log_prob_sum:,.3f}",
            )
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
        numeric = {6}

        def line(cells) -> str:
            out = []
            for i, (c, w) in enumerate(zip(cells, widths)):
                out.append(str(c).rjust(w) if i in numeric else str(c).ljust(w))
            return "│ " + " │ ".join(out) + " │"

        def rule(left: str, mid: str, right: str) -> str:
            return left + mid.join("─" * (w + 2) for w in widths) + right

        lines = [f"{self.method}: trace of one batch of {self.batch_size}", rule("┌", "┬", "┐")]
        lines.append(line(header))
        lines.append(rule("├", "┼", "┤"))
        last_program = None
        for row, cells in zip(self.rows, body):
            if last_program is not None and row.program != last_program:
                lines.append(rule("├", "┼", "┤"))
            lines.append(line(cells))
            last_program = row.program
        lines.append(rule("└", "┴", "┘"))
        if self.elbo_parts:
            lines.append("ELBO parts, nats per example:")
            width = max(len(k) for k in self.elbo_parts)
            for key, value in self.elbo_parts.items():
                lines.append(f"  {key.ljust(width)}  {value:12.4f}")
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape else "()"


def _describe(fn) -> str:
    """Readable name of a (possibly wrapped) distribution: ``Categorical(17) ▸ to_event(1)``."""
    suffix = []
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        if isinstance(fn, dist.Independent):
            suffix.append(f"to_event({fn.reinterpreted_batch_ndims})")
        fn = fn.base_dist
    name = type(fn).__name__
    if isinstance(fn, dist.Categorical):
        name += f"({fn.probs.shape[-1] if 'probs' in fn.__dict__ else fn.logits.shape[-1]})"
    return " ▸ ".join([name, *reversed(suffix)])


@torch.no_grad()
def inspect_trace(method: nn.Module, x: torch.Tensor, *, seed: int = 0) -> TraceReport:
    """Trace ``method``'s guide and model on the batch ``x`` (``(B, D)``) and tabulate the sites.

    The global RNG is forked and seeded with ``seed``; nothing outside changes. A method without a
    guide (a GAN, a consistency model) has no ELBO to split: its generative program is traced instead,
    run for ``B`` samples with nothing observed (program ``"model (generative)"``).

    Returns:
        A :class:`TraceReport`; ``print(report)`` shows the table.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"Expected a batch x of shape (B, D), but found {getattr(x, 'shape', x)}.")
    batch = x.shape[0]
    report = TraceReport(method=getattr(method, "name", "") or type(method).__name__, batch_size=batch)
    with seeded(seed, x):
        try:
            guide_trace = poutine.trace(method.guide).get_trace(x)
        except NotImplementedError:  # no guide: the generative program is what there is to trace
            trace = poutine.trace(method.model).get_trace(None, batch_size=batch)
            for name, site in sample_sites(trace):
                fn, value = site["fn"], site["value"]
                lp = float(scale_and_mask(fn.log_prob(value), site["scale"], site["mask"]).sum())
                report.rows.append(SiteRow("model (generative)", name, "latent", _describe(fn),
                                           tuple(fn.batch_shape), tuple(fn.event_shape),
                                           tuple(torch.as_tensor(value).shape), lp))  # fmt: skip
            return report
        model_trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(x)
    sums = {"obs": 0.0, "prior": 0.0, "guide": 0.0}
    kl_total, kl_exact = 0.0, True
    for program, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in sample_sites(trace):
            fn = site["fn"]
            observed = site["is_observed"]
            # As in the ELBO: each term carries its site's poutine.scale and poutine.mask.
            lp = float(scale_and_mask(fn.log_prob(site["value"]), site["scale"], site["mask"]).sum())
            kind = "observed" if observed else "latent"
            if program == "model":
                sums["obs" if observed else "prior"] += lp
            else:
                sums["guide"] += lp
            report.rows.append(
                SiteRow(
                    program,
                    name,
                    kind,
                    _describe(fn),
                    tuple(fn.batch_shape),
                    tuple(fn.event_shape),
                    tuple(torch.as_tensor(site["value"]).shape),
                    lp,
                )
            )
            if program == "model" and not observed and name in guide_trace.nodes:
                try:
                    q_site = guide_trace.nodes[name]
                    kl = kl_divergence(q_site["fn"], fn)
                    kl_total += float(scale_and_mask(kl, q_site["scale"], q_site["mask"]).sum())
                except NotImplementedError:
                    kl_exact = False
    parts = {
        "E_q log p(x|z)": sums["obs"],
        "log p(z)": sums["prior"],
        "log q(z|x)": sums["guide"],
        "ELBO (one sample)": sums["obs"] + sums["prior"] - sums["guide"],
    }
    if kl_exact and any(r.kind == "latent" and r.program == "model" for r in report.rows):
        parts["KL(q || p), analytic"] = kl_total
        parts["ELBO (analytic KL)"] = sums["obs"] - kl_total
    report.elbo_parts = {k: v / batch for k, v in parts.items()}
    return report
