r"""Time/noise-conditioned networks: a sinusoidal embedding, an MLP and a small UNet.

These are the function approximators the methods plug into their programs
(decoders, discriminators, noise/score predictors). They hold no method logic.

Conditioning convention: the networks do **no** rescaling of ``t``. Callers
pass ``t`` on the scale the sinusoidal embedding expects, i.e. spanning
roughly ``[0, 1000]``: a DDPM step index ``0..T-1`` as is, a continuous
``t in [0, 1]`` multiplied by ``1000`` (score SDEs), or ``log(sigma)`` (NCSN,
possibly times a constant). With ``max_period = 10000`` the lowest frequency
has period ``2 pi * 10000``, so inputs of order ``1`` are encoded mostly by the
high frequencies only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "NetSpec", "SinusoidalEmbedding", "UNet", "denoiser_net"]

_ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, but found {value!r}.")


def _as_time(t: Tensor | float, batch_shape: torch.Size, like: Tensor) -> Tensor:
    """Returns ``t`` as a tensor of ``like``'s dtype/device, checked broadcastable to ``batch_shape``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    try:
        shape = torch.broadcast_shapes(t.shape, batch_shape)
    except RuntimeError:
        shape = None
    if shape != batch_shape:
        raise ValueError(
            f"Expected t broadcastable to the batch shape {tuple(batch_shape)}, "
            f"but found t of shape {tuple(t.shape)}."
        )
    return t


def _check_t(t: object, conditional: bool, owner: str) -> None:
    if conditional and t is None:
        raise ValueError(f"Expected a time t for a conditional {owner} (embed_dim set), but found None.")
    if not conditional and t is not None:
        raise ValueError(
            f"Expected t=None for an unconditional {owner} (embed_dim=None), but found {type(t).__name__}."
        )


class SinusoidalEmbedding(nn.Module):
    r"""Sinusoidal embedding of a scalar time or noise level.

    With ``half = dim // 2`` and frequencies
    :math:`\omega_i = \text{max\_period}^{-i / \text{half}}`, ``i = 0..half-1``,
    the embedding is :math:`[\sin(t \omega_0), \dots, \sin(t \omega_{half-1}),
    \cos(t \omega_0), \dots, \cos(t \omega_{half-1})]` (the Transformer's
    positional encoding with sines and cosines concatenated rather than
    interleaved, as in DDPM).

    Args:
        dim: Embedding size, even and at least 2.
        max_period: Longest period scale (the Transformer's 10000).

    References:
        Vaswani et al., "Attention Is All You Need", arXiv:1706.03762.
        Ho et al., "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        _check_positive_int("dim", dim)
        if dim % 2:
            raise ValueError(f"Expected an even embedding dim, but found {dim}.")
        if not max_period > 1.0:
            raise ValueError(f"Expected max_period > 1, but found {max_period}.")
        self.dim = dim
        self.max_period = float(max_period)

    def forward(self, t: Tensor | float) -> Tensor:
        r"""Embeds ``t``.

        Args:
            t: Times of any shape ``(...)`` (a scalar is ``()``); integer steps are
                converted to the default float dtype.

        Returns:
            Tensor of shape ``(..., dim)``.
        """
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        half = self.dim // 2
        exponent = torch.arange(half, dtype=t.dtype, device=t.device) / half
        freqs = torch.exp(-math.log(self.max_period) * exponent)
        args = t.unsqueeze(-1) * freqs
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}"


def _time_mlp(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        SinusoidalEmbedding(embed_dim),
        nn.Linear(embed_dim, embed_dim),
        nn.SiLU(),
        nn.Linear(embed_dim, embed_dim),
    )


class MLP(nn.Module):
    r"""Multilayer perceptron, optionally conditioned on a time/noise level ``t``.

    With ``embed_dim`` set, ``t`` is embedded by :class:`SinusoidalEmbedding`
    followed by a 2-layer SiLU MLP, and a per-layer linear projection of
    ``silu(temb)`` is **added** to every hidden layer's pre-activation (the
    additive conditioning of DDPM's residual blocks). ``t`` is used on the scale
    given (see the module docstring): pass a DDPM index as is, a continuous
    ``t in [0, 1]`` times 1000, or NCSN's ``log(sigma)``.

    Args:
        in_dim: Input size ``D``.
        out_dim: Output size.
        hidden: Hidden layer widths (at least one when ``embed_dim`` is set).
        embed_dim: Size of the time embedding; ``None`` for a plain MLP.
        activation: One of ``"silu", "relu", "gelu", "tanh", "softplus"``.
        zero_init_last: Zero the last layer's weight and bias, so the network
            starts as the zero function (common for score/noise networks).

    Example:
        >>> net = MLP(2, 2, (64, 64), embed_dim=32)
        >>> net(torch.randn(8, 128, 2), torch.rand(128) * 1000).shape
        torch.Size([8, 128, 2])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (256, 256),
        *,
        embed_dim: int | None = None,
        activation: str = "silu",
        zero_init_last: bool = False,
    ):
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        _check_positive_int("out_dim", out_dim)
        hidden = tuple(hidden)
        for h in hidden:
            _check_positive_int("every hidden width", h)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Expected activation in {sorted(_ACTIVATIONS)}, but found {activation!r}.")
        if embed_dim is not None and not hidden:
            raise ValueError("Expected at least one hidden layer when embed_dim is set, but found hidden=().")
        self.in_dim, self.out_dim, self.embed_dim = in_dim, out_dim, embed_dim
        widths = (in_dim, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = _ACTIVATIONS[activation]()
        self.out = nn.Linear(widths[-1], out_dim)
        if zero_init_last:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        if embed_dim is not None:
            self.time_embed = _time_mlp(embed_dim)
            self.time_proj = nn.ModuleList(nn.Linear(embed_dim, h) for h in hidden)

    def forward(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        r"""Applies the network.

        Args:
            x: Inputs of shape ``(..., D)``, any number of leading dims (e.g.
                ``(B, D)`` or Pyro's ``(K, B, D)``).
            t: ``None`` for an unconditional MLP; otherwise a scalar or a tensor
                broadcastable to ``x.shape[:-1]`` (e.g. ``(B,)`` or ``()``).

        Returns:
            Tensor of shape ``(..., out_dim)``.
        """
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"Expected x of shape (..., {self.in_dim}), but found {tuple(x.shape)}.")
        _check_t(t, self.embed_dim is not None, "MLP")
        h = x
        if self.embed_dim is None:
            for layer in self.layers:
                h = self.act(layer(h))
        else:
            # Embed t at its own (small) shape; the addition broadcasts it over the batch.
            t = _as_time(t, x.shape[:-1], x)
            temb = F.silu(self.time_embed(t))
            for layer, proj in zip(self.layers, self.time_proj):
                h = self.act(layer(h) + proj(temb))
        return self.out(h)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _ResBlock(nn.Module):
    """DDPM residual block: (GN, SiLU, conv) twice, time embedding added in between."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int | None, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(embed_dim, c_out) if embed_dim is not None else None
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    r"""Small DDPM-style UNet for noise/score prediction on square images.

    Level ``i`` has ``base_channels * channel_mults[i]`` channels and resolution
    ``image_size / 2**i``; each level holds ``num_res_blocks`` residual blocks
    (GroupNorm, SiLU, 3x3 convs, time embedding added per block) on the way
    down and ``num_res_blocks + 1`` on the way up, joined by skip connections.
    The middle block at the lowest resolution is ResBlock, optional single-head
    self-attention, ResBlock. The output conv is zero-initialized, so the
    network starts as the zero function. ``t`` is used on the scale given (see
    the module docstring).

    Args:
        in_channels: Image channels ``C``.
        out_channels: Output channels; defaults to ``in_channels``.
        image_size: ``H == W``; must be divisible by ``2**(len(channel_mults) - 1)``
            (8 with ``(1, 2)`` or ``(1, 2, 2)``; 28 with ``(1, 2)`` or ``(1, 2, 2)``).
        base_channels: Channels of the first level.
        channel_mults: Channel multiplier per resolution level.
        num_res_blocks: Residual blocks per level on the way down.
        embed_dim: Size of the time embedding; ``None`` for an unconditional net.
        dropout: Dropout rate inside the residual blocks.
        attention: Add self-attention to the middle block.

    References:
        Ronneberger et al., "U-Net", arXiv:1505.04597.
        Ho et al., "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        *,
        image_size: int = 8,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        embed_dim: int | None = 128,
        dropout: float = 0.0,
        attention: bool = False,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in [
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("image_size", image_size),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
        ]:
            _check_positive_int(name, value)
        channel_mults = tuple(channel_mults)
        if not channel_mults:
            raise ValueError("Expected a non-empty channel_mults, but found ().")
        for m in channel_mults:
            _check_positive_int("every channel multiplier", m)
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(
                f"Expected image_size divisible by 2**(len(channel_mults) - 1) = {factor}, "
                f"but found image_size={image_size}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1), but found {dropout}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size, self.embed_dim = image_size, embed_dim
        self.time_embed = _time_mlp(embed_dim) if embed_dim is not None else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        ch, skips = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(ch, base_channels * mult, embed_dim, dropout))
                ch = base_channels * mult
                skips.append(ch)
            if i < len(channel_mults) - 1:
                self.down.append(_Downsample(ch))
                skips.append(ch)
        self.mid1 = _ResBlock(ch, ch, embed_dim, dropout)
        self.attn = _SelfAttention(ch) if attention else nn.Identity()
        self.mid2 = _ResBlock(ch, ch, embed_dim, dropout)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), base_channels * mult, embed_dim, dropout))
                ch = base_channels * mult
            if i > 0:
                self.up.append(_Upsample(ch))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        r"""Applies the network.

        Args:
            x: Images of shape ``(B, C, H, W)``, or ``(..., C, H, W)`` with any
                leading dims (flattened internally and restored).
            t: ``None`` for an unconditional net; otherwise a scalar or a tensor
                broadcastable to the leading dims (e.g. ``(B,)``).

        Returns:
            Tensor of shape ``(..., out_channels, H, W)``.
        """
        size = self.image_size
        if x.ndim < 3 or x.shape[-3:] != (self.in_channels, size, size):
            raise ValueError(
                f"Expected x of shape (..., {self.in_channels}, {size}, {size}), but found {tuple(x.shape)}."
            )
        _check_t(t, self.embed_dim is not None, "UNet")
        lead = x.shape[:-3]
        h = x.reshape(-1, *x.shape[-3:])
        temb = None
        if self.time_embed is not None:
            t = _as_time(t, lead, x).expand(lead).reshape(-1)
            temb = F.silu(self.time_embed(t))

        h = self.conv_in(h)
        hs = [h]
        for block in self.down:
            h = block(h, temb) if isinstance(block, _ResBlock) else block(h)
            hs.append(h)
        h = self.mid2(self.attn(self.mid1(h, temb)), temb)
        for block in self.up:
            if isinstance(block, _ResBlock):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = block(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.reshape(*lead, *h.shape[1:])


def denoiser_net(
    event_shape: Sequence[int],
    *,
    hidden: Sequence[int] = (128, 128, 128),
    embed_dim: int = 64,
    base_channels: int = 32,
    channel_mults: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    dropout: float = 0.0,
    attention: bool = False,
    zero_init_last: bool = True,
) -> nn.Module:
    """The time-conditioned network ``net(x, t) -> x``-shaped output that the diffusion methods share.

    Square images ``(C, H, H)`` get a :class:`UNet`; anything else is flattened to ``D`` and gets an
    :class:`MLP` ``D -> hidden -> D`` with a sinusoidal time embedding.

    Args:
        event_shape: the shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``.
        hidden: MLP widths.
        embed_dim: size of the time embedding (both networks).
        base_channels, channel_mults, num_res_blocks, dropout, attention: UNet options.
        zero_init_last: start the MLP's output layer at zero (the output starts at 0).
    """
    event_shape = tuple(int(n) for n in event_shape)
    if len(event_shape) == 3 and event_shape[1] == event_shape[2]:
        return UNet(
            event_shape[0],
            image_size=event_shape[1],
            base_channels=base_channels,
            channel_mults=channel_mults,
            num_res_blocks=num_res_blocks,
            embed_dim=embed_dim,
            dropout=dropout,
            attention=attention,
        )
    dim = math.prod(event_shape)
    return MLP(dim, dim, hidden, embed_dim=embed_dim, zero_init_last=zero_init_last)


@dataclass(frozen=True)
class NetSpec:
    """The specification of a diffusion method's network (:func:`denoiser_net`), composed into the method.

    A method takes its network as a spec (or as a module of the user's own): the spec's fields are the
    method's flat keyword arguments and config keys (``hidden``, ``embed_dim``, ... as ``--set``
    names them), so configs stay flat and old run directories load as before.

    Attributes:
        hidden: MLP hidden widths (vector data).
        embed_dim: size of the time embedding.
        base_channels, channel_mults, num_res_blocks, dropout, attention: the UNet (square images).
    """

    hidden: tuple[int, ...] = (128, 128, 128)
    embed_dim: int = 64
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    attention: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> NetSpec:
        """A spec from a method's keyword arguments (``defaults`` first, then ``options``).

        Raises:
            TypeError: an option that is not a field, naming the fields (as a constructor would).
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the network takes {names}")
        spec = replace(cls(), **{**dict(defaults or {}), **dict(options)})
        return replace(spec, hidden=tuple(spec.hidden), channel_mults=tuple(spec.channel_mults))

    def config(self) -> dict[str, Any]:
        """The fields as JSON-ready config entries (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def build(self, event_shape: Sequence[int]) -> nn.Module:
        """The network for observations of ``event_shape`` (:func:`denoiser_net`)."""
        return denoiser_net(event_shape, **asdict(self))
