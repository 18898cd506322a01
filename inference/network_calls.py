"""Counting network evaluations per sample (NFE) of any sampler, by forward hooks on a method's modules."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["NetworkCalls"]


class NetworkCalls:
    r"""Counts network evaluations per sample while a sampler runs.

    A *network call* is an outermost forward call of a submodule of the method (the method
    itself excluded): a call made while no other submodule's forward is running, e.g. the
    score or denoiser net once per sampler step, the decoder or generator once, a flow's
    conditioner once per layer. Its *rows* are the leading size of its first tensor argument.
    NFE per sample is

    .. math:: \mathrm{NFE} = \frac{1}{n}\sum_{\text{network calls } c} \mathrm{rows}(c),

    for ``n`` samples drawn, i.e. the number of network evaluations each sample went through,
    whatever the sampler's batching. A fixed-step sampler that evaluates one net on the whole
    batch per step gives its number of steps; an adaptive ODE solver gives its mean count.

    Example:
        >>> with NetworkCalls(method) as calls:
        ...     x = draw_samples(method, 100)
        >>> calls.per_sample(100)
    """

    def __init__(self, method: nn.Module) -> None:
        self._modules = [m for m in method.modules() if m is not method]
        self._handles: list[Any] = []
        self._depth = 0
        self.calls = 0
        self.rows = 0

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self._depth == 0:
            first = next((a for a in args if isinstance(a, Tensor)), None)
            self.calls += 1
            self.rows += int(first.shape[0]) if first is not None and first.dim() >= 1 else 1
        self._depth += 1

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1

    def __enter__(self) -> NetworkCalls:
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def per_sample(self, num: int) -> float:
        """Network evaluations per sample for ``num`` samples drawn."""
        return self.rows / num
