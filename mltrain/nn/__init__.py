"""Models only: plain PyTorch modules that know nothing of MPI.

``ResNet`` is a residual network read as a forward-Euler discretisation of an ODE:
``x_{k+1} = x_k + h * f(x_k; theta_k)`` with ``h = T / depth``. It exposes the residual-
block protocol that the layer-parallel and multilevel code (later layers) rely on:
``opening`` (input -> state), ``blocks`` (a ModuleList of blocks, each with a step ``h``),
``closing`` (state -> logits).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mltrain import ops

__all__ = ["MLP", "ResNet", "ResidualBlock", "CNN", "ImagePool", "build_model", "stem_error",
           "is_residual", "check_residual", "smooth_in_depth", "set_depth_penalty",
           "depth_penalty", "add_depth_penalty"]

PROTOCOL = ("opening", "blocks", "closing")


def is_residual(model: nn.Module) -> bool:
    """Whether ``model`` has the parts of the residual-block protocol (see the module
    docstring); ``check_residual`` checks the blocks too."""
    return all(hasattr(model, a) for a in PROTOCOL)


def check_residual(model: nn.Module, what: str = "multilevel training") -> None:
    """Raises ConfigError unless ``model`` follows the residual-block protocol: opening,
    a non-empty ModuleList of blocks with the same parameters and a step ``h`` each, and
    closing. ``what`` names the feature that needs it."""
    from mltrain.config import ConfigError

    missing = [a for a in PROTOCOL if not hasattr(model, a)]
    if missing:
        raise ConfigError(f"{what} needs a residual network with opening, blocks and closing "
                          f"(model.name = 'resnet', or see examples/custom_model.py); "
                          f"{type(model).__name__} lacks {', '.join(missing)}")
    blocks = model.blocks
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"{what}: model.blocks must be a non-empty ModuleList")
    names = [tuple(n for n, _ in b.named_parameters()) for b in blocks]
    if len(set(names)) != 1 or not all(hasattr(b, "h") for b in blocks):
        raise ConfigError(f"{what}: every block needs the same parameters and a step "
                          "attribute h")


class MLP(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """One forward-Euler step ``x + h * relu(W x + b)``."""

    def __init__(self, width: int, h: float):
        super().__init__()
        self.h = h
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.h * torch.relu(self.linear(x))

    # The optional fast path of the layer-parallel protocol (``mltrain.mgrit``): MGRIT's
    # relaxation steps without autograd, and its adjoint's vector-Jacobian products by
    # hand. A step with ``scale`` s is x + s (block(x) - x), as the solver re-discretises.
    def mgrit_step(self, x: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """``x + s (self(x) - x)`` without autograd, bit for bit."""
        return ops.residual_step(x, self.linear.weight, self.linear.bias, self.h, scale)

    def mgrit_linearize(self, x: torch.Tensor):
        """What the vector-Jacobian products at ``x`` need: where the ReLU is active."""
        return ops.residual_mask(x, self.linear.weight, self.linear.bias)

    def mgrit_vjp(self, state, lam: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """lam^T d(step)/dx at the point ``state`` was linearised at:
        lam + s h W^T (mask * lam)."""
        return ops.residual_vjp(lam, state, self.linear.weight, self.h, scale)

    # Sweeps over several blocks in one call (mltrain.ops, C++ when built): what the
    # methods above give step by step, bit for bit, without an interpreter call per step.
    # The parameters are read from the module dicts: nn.Module's attribute fallback costs
    # about a microsecond a lookup, as much as a step's arithmetic here.
    @staticmethod
    def _weights(blocks) -> tuple[list, list]:
        lin = [b._modules["linear"]._parameters for b in blocks]
        return [p["weight"] for p in lin], [p["bias"] for p in lin]

    @staticmethod
    def mgrit_sweep(blocks, x: torch.Tensor, scale: int = 1, adds=None) -> list[torch.Tensor]:
        """The states after each block's step from ``x`` (``adds[i]`` added after step i)."""
        w, b = ResidualBlock._weights(blocks)
        return ops.residual_sweep(x, w, b, [k.h for k in blocks], scale, adds)

    @staticmethod
    def mgrit_steps(blocks, xs, scale: int = 1) -> list[torch.Tensor]:
        """``mgrit_step`` of each block from its own state."""
        w, b = ResidualBlock._weights(blocks)
        return ops.residual_steps(xs, w, b, [k.h for k in blocks], scale)

    @staticmethod
    def mgrit_linearize_many(blocks, xs) -> list:
        """``mgrit_linearize`` of each block at its state."""
        w, b = ResidualBlock._weights(blocks)
        return ops.residual_masks(xs, w, b)

    @staticmethod
    def mgrit_vjp_sweep(blocks, states, lam: torch.Tensor, scale: int = 1,
                        adds=None) -> list[torch.Tensor]:
        """The chain of ``mgrit_vjp`` through ``blocks`` in the order given."""
        w, _ = ResidualBlock._weights(blocks)
        return ops.residual_vjp_sweep(lam, states, w, [k.h for k in blocks], scale, adds)


class ImagePool(nn.Module):
    """Average pooling of image inputs by ``k`` in both directions, flattened (a cheap stem:
    the opening layer then has k^2 times fewer inputs)."""

    def __init__(self, input_shape: tuple[int, ...], k: int):
        super().__init__()
        self.shape, self.k = tuple(input_shape), k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(x.reshape(-1, *self.shape), self.k)
        return x.flatten(1)


class ResNet(nn.Module):
    """Opening layer, ``depth`` residual blocks with step ``T / depth``, closing layer;
    ``stem``: a module in front of the opening layer whose output has ``in_features``."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int,
                 T: float = 1.0, stem: nn.Module | None = None):
        super().__init__()
        self.T = T
        self.opening = nn.Sequential(*([stem] if stem is not None else []), nn.Flatten(),
                                     nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(ResidualBlock(width, T / depth) for _ in range(depth))
        self.closing = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.opening(x)
        for block in self.blocks:
            x = block(x)
        return self.closing(x)


class CNN(nn.Module):
    """``depth`` conv-ReLU blocks (halving the image while it is at least 4 wide),
    global average pooling, linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], width: int, depth: int, num_classes: int):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            c = width
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def smooth_in_depth(model: nn.Module) -> None:
    """Makes a residual network's block parameters linear in depth: block k gets
    (1 - t) theta_first + t theta_last, t = k / (depth - 1), from the first and last blocks'
    own (independent) draws. A network that is the discretisation of one smooth ODE, whose
    coarse levels see it as the fine one does (``model.init = "smooth"``). Not
    collective."""
    check_residual(model)
    blocks = model.blocks
    n = len(blocks)
    if n < 2:
        return
    first = [p.detach().clone() for p in blocks[0].parameters()]
    last = [p.detach().clone() for p in blocks[n - 1].parameters()]
    with torch.no_grad():
        for k, block in enumerate(blocks):
            t = k / (n - 1)
            for p, a, b in zip(block.parameters(), first, last):
                p.copy_(a * (1 - t) + b * t)


def set_depth_penalty(model: nn.Module, alpha: float) -> None:
    """Gives ``model`` the smoothness-in-depth term of ``depth_penalty`` with weight
    ``alpha`` (``model.depth_penalty``; ConfigError unless ``model`` follows the
    residual-block protocol). Coarse copies of the model (``mltrain.multilevel``) inherit
    it with their own step. Not collective."""
    if alpha:
        check_residual(model, "model.depth_penalty")
    model.depth_alpha = float(alpha)


def depth_penalty(model: nn.Module):
    """alpha/2 sum_k ||theta_{k+1} - theta_k||^2 / h over consecutive residual blocks
    (alpha: ``set_depth_penalty``; h: the blocks' step), the forward-difference discretization
    of alpha/2 int ||theta'(t)||^2 dt (Haber and Ruthotto 2017). A coarse level, with half
    the blocks at twice the step, discretizes the same integral, so its coarse model stays
    consistent. It penalizes parameters that oscillate in depth: on a deep network those
    directions become the stiffest, the case a multilevel method is built for. A
    differentiable scalar tensor, or None without a penalty (so that a run without one
    adds nothing to its training step). Not collective."""
    alpha = getattr(model, "depth_alpha", 0.0)
    if not alpha or len(model.blocks) < 2:
        return None
    total = 0.0
    for name, _ in model.blocks[0].named_parameters():
        stacked = torch.stack([b.get_parameter(name) for b in model.blocks])
        total = total + (stacked[1:] - stacked[:-1]).square().sum()
    return total * (0.5 * alpha / model.blocks[0].h)


def add_depth_penalty(loss, model: nn.Module):
    """``loss`` plus ``model``'s ``depth_penalty``; ``loss`` itself without one. Not
    collective."""
    term = depth_penalty(model)
    return loss if term is None else loss + term


def stem_error(input_shape: tuple[int, ...], k: int) -> str | None:
    """Why ``model.stem_pool = k`` does not fit inputs of ``input_shape`` (None: it does).
    Not collective."""
    if k == 1:
        return None
    if len(input_shape) != 3:
        return f"model.stem_pool: pools images (C, H, W), the inputs are {input_shape}"
    if input_shape[1] % k or input_shape[2] % k:
        return (f"model.stem_pool: {k} does not divide the {input_shape[1]} x "
                f"{input_shape[2]} images")
    return None


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, width: int,
                depth: int, dtype: torch.dtype = torch.float32,
                init: str = "independent", stem_pool: int = 1) -> nn.Module:
    """The model named by ``model.name`` for inputs of ``input_shape`` (C, H, W);
    ``init = "smooth"``: a residual network's blocks linear in depth (``smooth_in_depth``);
    ``stem_pool``: a residual network's images average-pooled by that factor before its
    opening layer (``stem_error`` says when that does not fit).

    Initialisation uses torch's global RNG: seed it identically on every rank, or
    broadcast the parameters afterwards. Not collective.
    """
    in_features = math.prod(input_shape)
    if name == "mlp":
        model = MLP(in_features, width, depth, num_classes)
    elif name == "resnet":
        if stem_pool > 1:
            why = stem_error(input_shape, stem_pool)
            if why:
                raise ValueError(why)
            model = ResNet(in_features // stem_pool ** 2, width, depth, num_classes,
                           stem=ImagePool(input_shape, stem_pool))
        else:
            model = ResNet(in_features, width, depth, num_classes)
    elif name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model.name = 'cnn' needs image inputs (C, H, W), got {input_shape}")
        model = CNN(input_shape, width, depth, num_classes)
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(dtype)
    if init == "smooth":  # in the run's precision, so the blocks are linear in it
        smooth_in_depth(model)
    return model
