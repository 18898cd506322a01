"""Contract tests for probgen.nets: shapes, conditioning, gradients, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from probgen.nets import MLP, SinusoidalEmbedding, UNet


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_all_grads_nonzero(net: nn.Module) -> None:
    for name, p in net.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


# --- SinusoidalEmbedding ----------------------------------------------------


def test_sinusoidal_embedding_matches_formula():
    emb = SinusoidalEmbedding(8, max_period=10000.0)
    t = torch.tensor([0.0, 3.0, 250.0])
    out = emb(t)
    assert out.shape == (3, 8)
    # half = 4, omega_i = 10000 ** (-i / 4); layout [sin(t w_0..3), cos(t w_0..3)].
    assert out[1, 1].item() == pytest.approx(math.sin(3.0 * 10000.0 ** (-1 / 4)), abs=1e-6)
    assert out[2, 4 + 2].item() == pytest.approx(math.cos(250.0 * 10000.0 ** (-2 / 4)), abs=1e-5)
    assert out[2, 0].item() == pytest.approx(math.sin(250.0), abs=1e-5)
    torch.testing.assert_close(out[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_sinusoidal_embedding_shapes_and_int_input():
    emb = SinusoidalEmbedding(16)
    assert emb(torch.tensor(5.0)).shape == (16,)
    assert emb(torch.zeros(3, 4)).shape == (3, 4, 16)
    ints = emb(torch.tensor([7, 999]))
    assert ints.dtype == torch.get_default_dtype()
    torch.testing.assert_close(ints, emb(torch.tensor([7.0, 999.0])))


@pytest.mark.parametrize("dim", [0, 7])
def test_sinusoidal_embedding_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match="Expected"):
        SinusoidalEmbedding(dim)


# --- MLP --------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (5,), (3, 5)])
@pytest.mark.parametrize("conditional", [False, True])
def test_mlp_shapes_any_leading_dims(lead, conditional):
    net = MLP(4, 3, (16, 16), embed_dim=8 if conditional else None)
    x = _randn(*lead, 4)
    t = (torch.rand(lead[-1:]) * 1000 if lead else 10.0) if conditional else None
    assert net(x, t).shape == (*lead, 3)
    if conditional:
        assert net(x, torch.tensor(10.0)).shape == (*lead, 3)
        assert net(x, 10).shape == (*lead, 3)


def test_mlp_time_changes_output_and_broadcasts_per_example():
    net = MLP(2, 2, (32, 32), embed_dim=16)
    x = _randn(2, 6, 2)
    assert not torch.allclose(net(x, 10.0), net(x, 500.0), atol=1e-4)
    t = torch.tensor([0.0, 100.0, 200.0, 300.0, 400.0, 999.0])
    out = net(x, t)
    for i in range(6):
        torch.testing.assert_close(out[:, i], net(x[:, i], t[i]))


def test_mlp_gradients_reach_every_parameter():
    net = MLP(3, 2, (16, 16), embed_dim=8)
    x = _randn(10, 3)
    net(x, torch.rand(10) * 1000).square().sum().backward()
    _assert_all_grads_nonzero(net)
    assert len(list(net.time_embed.parameters())) == 4


def test_mlp_zero_init_last():
    net = MLP(3, 2, (16,), embed_dim=8, zero_init_last=True)
    assert torch.count_nonzero(net(_randn(4, 3), 3.0)) == 0
    assert torch.count_nonzero(MLP(3, 2, (16,))(_randn(4, 3))) > 0


@pytest.mark.parametrize("activation", ["silu", "relu", "gelu", "tanh", "softplus"])
def test_mlp_activations(activation):
    assert MLP(2, 1, (8,), activation=activation)(_randn(5, 2)).shape == (5, 1)


def test_mlp_validation():
    with pytest.raises(ValueError, match="Expected activation"):
        MLP(2, 2, activation="sigmoid")
    with pytest.raises(ValueError, match="Expected at least one hidden layer"):
        MLP(2, 2, (), embed_dim=8)
    with pytest.raises(ValueError, match=r"Expected x of shape \(\.\.\., 2\), but found \(5, 3\)"):
        MLP(2, 2)(_randn(5, 3))
    with pytest.raises(ValueError, match="Expected t=None"):
        MLP(2, 2)(_randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="Expected a time t"):
        MLP(2, 2, embed_dim=8)(_randn(5, 2))
    with pytest.raises(ValueError, match="Expected t broadcastable"):
        MLP(2, 2, embed_dim=8)(_randn(5, 2), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="Expected t broadcastable"):
        MLP(2, 2, embed_dim=8)(_randn(5, 2), torch.zeros(4))


# --- UNet -------------------------------------------------------------------


def _small_unet(**kwargs) -> UNet:
    kwargs = {"base_channels": 8, "embed_dim": 16, **kwargs}
    return UNet(**kwargs)


@pytest.mark.parametrize(
    "size, mults, attention",
    [(8, (1, 2), False), (8, (1, 2, 2), True), (28, (1, 2), False), (28, (1, 2, 2), True)],
)
def test_unet_shapes(size, mults, attention):
    net = _small_unet(
        in_channels=1, out_channels=2, image_size=size, channel_mults=mults, attention=attention
    )
    x = _randn(3, 1, size, size)
    out = net(x, torch.tensor([1.0, 50.0, 900.0]))
    assert out.shape == (3, 2, size, size)
    assert torch.count_nonzero(out) == 0  # zero-initialized output conv


def test_unet_leading_dims_and_per_example_time():
    net = _small_unet(in_channels=2, image_size=8, attention=True)
    nn.init.normal_(net.conv_out.weight, std=0.1)
    x = _randn(2, 3, 2, 8, 8)
    t = torch.tensor([5, 400, 999])  # integer DDPM indices, broadcast over the leading dim
    out = net(x, t)
    assert out.shape == (2, 3, 2, 8, 8)
    torch.testing.assert_close(out[1], net(x[1], t), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0, 2], net(x[0, 2], 999.0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(net(x, 10.0), net(x, 500.0), atol=1e-4)


@pytest.mark.parametrize("attention", [False, True])
def test_unet_gradients_reach_every_parameter(attention):
    net = _small_unet(image_size=8, channel_mults=(1, 2, 2), attention=attention)
    nn.init.normal_(net.conv_out.weight, std=0.1)
    net(_randn(4, 1, 8, 8), torch.rand(4) * 1000).square().sum().backward()
    _assert_all_grads_nonzero(net)


def test_unet_unconditional():
    net = _small_unet(embed_dim=None)
    assert net(_randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="Expected t=None"):
        net(_randn(2, 1, 8, 8), 3.0)
    with pytest.raises(ValueError, match="Expected a time t"):
        _small_unet()(_randn(2, 1, 8, 8))


def test_unet_validation():
    with pytest.raises(ValueError, match=r"Expected image_size divisible by .* = 4, but found"):
        UNet(image_size=6, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match=r"Expected image_size divisible by .* = 2, but found"):
        UNet(image_size=7, channel_mults=(1, 2))
    net = _small_unet(image_size=8)
    with pytest.raises(ValueError, match=r"Expected x of shape \(\.\.\., 1, 8, 8\), but found"):
        net(_randn(2, 1, 16, 16), 1.0)
    with pytest.raises(ValueError, match=r"Expected x of shape \(\.\.\., 1, 8, 8\), but found"):
        net(_randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="Expected t broadcastable"):
        net(_randn(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="Expected dropout"):
        UNet(dropout=1.0)
