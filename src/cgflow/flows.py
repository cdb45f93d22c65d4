"""Conditional normalizing flows ``q(x_FG | s)`` over fine-grained internal coordinates.

Two models share one API (``sample``, ``log_prob``, ``hparams``; :func:`save_flow`,
:func:`load_flow`, :func:`build_flow`):

* :class:`ConditionalFlow` — a coupling flow of rational-quadratic (RQ) splines for many FG
  features, some of them circular (method-spec §2.1). Data pipeline, sampling direction::

      u0 ~ base  ->  coupling layers  ->  u  ->  InternalScaling.inverse  ->  x_FG

  The base is Uniform[-pi, pi) on circular features and N(0, 1) on the others. Each coupling
  layer transforms half of the features (random mask in even layers, its complement in odd
  ones) with splines whose parameters come from an MLP of the other half and of the context
  (CG coordinates: ``cos s, sin s`` if periodic, standardised ``s`` otherwise).

  - non-circular features: spline on ``[-B, B]`` (``tail_bound``, standardised units) with unit
    boundary derivatives and the identity outside;
  - circular features: the same spline rescaled onto ``[-pi, pi]`` (``x -> (pi/B) S(B x/pi)``,
    which leaves the log-det unchanged): endpoints fixed at ``+-pi`` with slope 1 at both ends,
    hence a diffeomorphism of the circle. It is conjugated by a fixed per-layer rotation
    (so the pinned point differs between layers) and followed by a learned, conditional rotation
    ``y = wrap(y + c(x_a, s))`` (log-det 0), cf. zuko's NCSF, whose shift is fixed.
  - identity features of circular type enter the conditioner as ``(cos, sin)``.
  - the last layer of every conditioner is zero, so an untrained flow is the identity
    (``x_FG = scaling^-1(u0)``).

* :class:`ConditionalAffine1D` — ``x = mu(s) + sigma(s) z`` for one FG feature (Müller–Brown,
  method-spec §2.2).

What comes from zuko: :class:`zuko.nn.MLP` (conditioners) and
:class:`zuko.transforms.MonotonicRQSTransform` (spline math: monotonic RQ spline on
``[-B, B]``, derivative 1 at both ends, identity outside). Written here by hand: the coupling
layer, the base and the context embedding. zuko's ``GeneralCouplingTransform`` / ``NSF(passes=2)``
do not fit because they feed the identity half raw to the hyper-network (no ``(cos, sin)``
embedding of circular features), use one spline domain for all features (no mix of circular
``[-pi, pi]`` and non-circular ``[-B, B]`` features in one layer) and have no conditional
circular rotations; their Uniform/Normal bases cannot be mixed either.

:class:`InternalScaling` is the fixed standardisation of method-spec §1.2 (reference = the
energy-minimised structure; stds per coordinate type; circular ones only shifted, mod 2 pi);
its constant log-det is part of ``log q``, so ``log q`` is a density over unscaled ``x_FG``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from zuko.nn import MLP
from zuko.transforms import MonotonicRQSTransform

from .coordinates import wrap_angle

if TYPE_CHECKING:
    from .systems import System

__all__ = [
    "ConditionalAffine1D",
    "ConditionalFlow",
    "InternalScaling",
    "assemble",
    "build_flow",
    "load_flow",
    "save_flow",
    "scaling_for",
    "split",
]

FILE_FORMAT = "cgflow-flow"
FILE_VERSION = 1
_LOG_2PI = math.log(2.0 * math.pi)
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = getattr(torch, str(dtype).removeprefix("torch."), None)
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"flow dtype must be float32 or float64, got {dtype!r}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _activation(name: str) -> type[nn.Module]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}"
        ) from None


def _mlp(n_in: int, n_out: int, hidden: int, depth: int, activation: str) -> MLP:
    if hidden < 1 or depth < 1:
        raise ValueError(f"conditioner needs hidden >= 1 and depth >= 1, got {hidden}, {depth}")
    return MLP(n_in, n_out, hidden_features=[hidden] * depth, activation=_activation(activation))


def _index(mask: Tensor) -> Tensor:
    return torch.nonzero(mask, as_tuple=False).flatten()


# --------------------------------------------------------------------------------- scaling
class InternalScaling(nn.Module):
    """Fixed elementwise map ``x -> u``: ``(x - ref)/std``; circular: ``wrap(x - ref)`` (std 1)."""

    def __init__(
        self, ref: Sequence[float] | Tensor, std: Sequence[float] | Tensor, circular: Sequence[bool]
    ) -> None:
        super().__init__()
        ref_t = torch.as_tensor(ref, dtype=torch.float64).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
        circ = torch.as_tensor(circular, dtype=torch.bool).flatten()
        if not ref_t.shape == std_t.shape == circ.shape:
            raise ValueError(
                f"scaling: ref, std and circular need equal lengths, got {ref_t.numel()}, "
                f"{std_t.numel()}, {circ.numel()}"
            )
        if not torch.isfinite(ref_t).all() or not (std_t > 0).all():
            raise ValueError("scaling: ref must be finite and std > 0")
        if (std_t[circ] != 1).any():
            raise ValueError("scaling: circular coordinates are not scaled (std must be 1)")
        self.register_buffer("ref", ref_t)
        self.register_buffer("std", std_t)
        self.register_buffer("circular", circ)

    @property
    def dim(self) -> int:
        return self.ref.numel()

    @property
    def log_det(self) -> Tensor:
        """``log|det du/dx|`` (a constant)."""
        return -self.std.log().sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled ``x [..., dim]`` -> standardised ``u`` and ``log|det du/dx|`` ``[...]``."""
        d = x - self.ref
        u = torch.where(self.circular, wrap_angle(d), d / self.std)
        return u, self.log_det.expand(x.shape[:-1])

    def inverse(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised ``u`` -> unscaled ``x`` (circular ones in [-pi, pi)) and ``log|det dx/du|``."""
        x = self.ref + self.std * u
        x = torch.where(self.circular, wrap_angle(x), x)
        return x, (-self.log_det).expand(u.shape[:-1])

    @property
    def hparams(self) -> dict[str, list]:
        return {
            "ref": self.ref.double().tolist(),
            "std": self.std.double().tolist(),
            "circular": self.circular.tolist(),
        }


def scaling_for(
    system: System,
    reference: Tensor | np.ndarray | None = None,
    bond_std: float = 0.005,
    angle_std: float = 0.15,
    dihedral_std: float = 0.2,
) -> InternalScaling:
    """The :class:`InternalScaling` of ``system``'s FG coordinates (method-spec §1.2).

    ``reference``: a configuration (``config_shape``) or an internal vector (``[n_internal]``);
    default the energy-minimised structure (``system.initial_configuration()``). Systems
    without a Z-matrix (analytic potentials) get ``ref 0, std 1`` (circular ones still wrapped).
    """
    n = system.n_internal
    circ = system.internal_circular.to(torch.bool)
    fg = list(system.fg_indices)
    zm = getattr(system, "zmatrix", None)
    if zm is None:
        ref = torch.zeros(n, dtype=torch.float64)
        std = torch.ones(n, dtype=torch.float64)
    else:
        if reference is None:
            reference = system.initial_configuration()[0]
        r = torch.as_tensor(reference, dtype=torch.float64)
        if tuple(r.shape) == tuple(system.config_shape):
            r = system.to_internal(r[None])[0]
        if tuple(r.shape) != (n,):
            raise ValueError(
                f"scaling reference must have shape {tuple(system.config_shape)} (configuration) "
                f"or ({n},) (internal), got {tuple(r.shape)}"
            )
        ref = r.clone()
        std = torch.full((n,), float("nan"), dtype=torch.float64)
        std[list(zm.bond_indices)] = bond_std
        std[list(zm.angle_indices)] = angle_std
        std[list(zm.dihedral_indices)] = dihedral_std
        if torch.isnan(std).any():
            raise ValueError("Z-matrix index lists do not cover the internal vector")
    std[circ] = 1.0
    return InternalScaling(ref[fg], std[fg], circ[fg].tolist())


# ------------------------------------------------------------------------- context / base
class _Context(nn.Module):
    """CG coordinates -> conditioner features: ``cos, sin`` if periodic, else ``(s - mean)/std``."""

    def __init__(
        self,
        periodic: Sequence[bool],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__()
        per = torch.as_tensor(list(periodic), dtype=torch.bool)
        n = per.numel()
        if n < 1:
            raise ValueError("a conditional flow needs at least one CG coordinate")
        m = torch.zeros(n, dtype=torch.float64) if mean is None else torch.as_tensor(mean)
        sd = torch.ones(n, dtype=torch.float64) if std is None else torch.as_tensor(std)
        m, sd = m.double().flatten(), sd.double().flatten()
        if m.numel() != n or sd.numel() != n:
            raise ValueError(f"cond_mean/cond_std need {n} entries (one per CG coordinate)")
        if not (sd > 0).all():
            raise ValueError("cond_std must be > 0")
        self.n = n
        self.register_buffer("per_idx", _index(per))
        self.register_buffer("lin_idx", _index(~per))
        self.register_buffer("mean", m[~per])
        self.register_buffer("std", sd[~per])
        self.n_features = 2 * int(per.sum()) + int((~per).sum())

    def forward(self, s: Tensor) -> Tensor:
        sp = s[:, self.per_idx]
        return torch.cat([sp.cos(), sp.sin(), (s[:, self.lin_idx] - self.mean) / self.std], -1)


# ------------------------------------------------------------------------- coupling layer
class _SplineCoupling(nn.Module):
    """One RQ-spline coupling layer over mixed circular / non-circular features."""

    def __init__(
        self,
        mask: Tensor,
        circular: Tensor,
        n_ctx: int,
        hidden: int,
        depth: int,
        n_bins: int,
        tail_bound: float,
        slope: float,
        offsets: Tensor,
        activation: str,
    ) -> None:
        super().__init__()
        self.n_bins, self.bound, self.slope = n_bins, float(tail_bound), float(slope)
        idx_b = _index(mask)
        circ_b = circular[mask]
        self.register_buffer("idx_b", idx_b)
        self.register_buffer("idx_a_lin", _index(~mask & ~circular))
        self.register_buffer("idx_a_circ", _index(~mask & circular))
        self.register_buffer("circ_b", circ_b)
        self.register_buffer("cpos", _index(circ_b))
        self.nb, self.nc = idx_b.numel(), int(circ_b.sum())
        scale = torch.where(circ_b, self.bound / math.pi, 1.0).double()
        self.register_buffer("scale_b", scale)
        off = torch.zeros(self.nb, dtype=torch.float64)
        off[circ_b] = offsets.double()[: self.nc]
        self.register_buffer("offset_b", off)
        n_in = self.idx_a_lin.numel() + 2 * self.idx_a_circ.numel() + n_ctx
        self.n_spline = self.nb * (3 * n_bins - 1)
        self.net = _mlp(n_in, self.n_spline + self.nc, hidden, depth, activation)
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _spline(self, x: Tensor, ctx: Tensor) -> tuple[MonotonicRQSTransform, Tensor]:
        xc = x[:, self.idx_a_circ]
        h = self.net(torch.cat([x[:, self.idx_a_lin], xc.cos(), xc.sin(), ctx], -1))
        k = self.n_bins
        p = h[:, : self.n_spline].unflatten(-1, (self.nb, 3 * k - 1))
        spline = MonotonicRQSTransform(
            p[..., :k], p[..., k : 2 * k], p[..., 2 * k :], bound=self.bound, slope=self.slope
        )
        shift = h.new_zeros(h.shape[0], self.nb).index_copy(1, self.cpos, h[:, self.n_spline :])
        return spline, shift

    def forward(self, x: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling direction: ``y``, ``log|det dy/dx|`` ``[B]``."""
        spline, shift = self._spline(x, ctx)
        xb = x[:, self.idx_b]
        if self.nc:
            xb = torch.where(self.circ_b, wrap_angle(xb + self.offset_b), xb)
        yb, ladj = spline.call_and_ladj(xb * self.scale_b)
        yb = yb / self.scale_b
        if self.nc:
            yb = torch.where(self.circ_b, wrap_angle(yb + shift - self.offset_b), yb)
        return x.index_copy(1, self.idx_b, yb), ladj.sum(-1)

    def inverse(self, y: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Density direction: ``x``, ``log|det dx/dy|`` ``[B]``."""
        spline, shift = self._spline(y, ctx)
        yb = y[:, self.idx_b]
        if self.nc:
            yb = torch.where(self.circ_b, wrap_angle(yb - shift + self.offset_b), yb)
        xs = spline.inv(yb * self.scale_b)
        _, ladj = spline.call_and_ladj(xs)
        xb = xs / self.scale_b
        if self.nc:
            xb = torch.where(self.circ_b, wrap_angle(xb - self.offset_b), xb)
        return y.index_copy(1, self.idx_b, xb), -ladj.sum(-1)


# -------------------------------------------------------------------------- spline flow
class ConditionalFlow(nn.Module):
    """``q(x_FG | s)``: RQ-spline coupling flow over ``dim`` features (see module docstring).

    ``n_blocks`` coupling layers (each transforms about half of the features; an even number
    makes every feature transformed ``n_blocks/2`` times), conditioners
    ``MLP[in -> hidden x depth -> out]``, ``n_bins`` bins, spline domain ``[-tail_bound,
    tail_bound]`` for non-circular features (standardised units), ``[-pi, pi]`` for circular
    ones. ``scaling`` (an :class:`InternalScaling` or its ``hparams``) maps unscaled FG
    coordinates to the flow's standardised space; ``None`` = identity (circular still wrapped).
    """

    kind = "ConditionalFlow"

    def __init__(
        self,
        dim: int,
        circular: Sequence[bool],
        cond_periodic: Sequence[bool],
        cond_mean: Sequence[float] | None = None,
        cond_std: Sequence[float] | None = None,
        n_blocks: int = 12,
        hidden: int = 256,
        depth: int = 2,
        n_bins: int = 8,
        tail_bound: float = 5.0,
        slope: float = 1e-3,
        activation: str = "relu",
        scaling: InternalScaling | dict[str, Any] | None = None,
        mask_seed: int = 0,
        dtype: str | torch.dtype = "float64",
    ) -> None:
        super().__init__()
        dt = _dtype(dtype)
        circ = torch.as_tensor(list(circular), dtype=torch.bool)
        if dim < 1 or circ.numel() != dim:
            raise ValueError(f"circular needs one flag per feature ({dim}), got {circ.numel()}")
        if n_blocks < 1 or n_bins < 2 or not tail_bound > 0:
            raise ValueError(
                f"need n_blocks >= 1, n_bins >= 2, tail_bound > 0; got {n_blocks}, {n_bins}, "
                f"{tail_bound}"
            )
        _activation(activation)
        if isinstance(scaling, InternalScaling):
            scaling = (
                scaling.hparams
            )  # a private copy: .to(dtype) below must not touch the caller's
        if isinstance(scaling, dict):
            scaling = InternalScaling(**scaling)
        if scaling is not None:
            if scaling.dim != dim or not torch.equal(scaling.circular.cpu(), circ):
                raise ValueError("scaling does not match the flow's features / circular flags")
        self.dim = dim
        self.context = _Context(cond_periodic, cond_mean, cond_std)
        self.n_cg = self.context.n
        self.scaling = scaling
        self.register_buffer("circular", circ)
        self.register_buffer("circ_idx", _index(circ))
        self.register_buffer("lin_idx", _index(~circ))
        layers = []
        mask = torch.ones(dim, dtype=torch.bool)
        for i in range(n_blocks):
            g = torch.Generator().manual_seed(mask_seed + i)
            if dim > 1:
                if i % 2 == 0:
                    mask = torch.randperm(dim, generator=g) < dim // 2
                else:
                    mask = ~mask
            offsets = (torch.rand(dim, generator=g, dtype=torch.float64) + 0.5) * math.pi
            layers.append(
                _SplineCoupling(
                    mask,
                    circ,
                    self.context.n_features,
                    hidden,
                    depth,
                    n_bins,
                    tail_bound,
                    slope,
                    offsets,
                    activation,
                )
            )
        self.layers = nn.ModuleList(layers)
        self._hparams: dict[str, Any] = {
            "kind": self.kind,
            "dim": int(dim),
            "circular": circ.tolist(),
            "cond_periodic": [bool(p) for p in cond_periodic],
            "cond_mean": None if cond_mean is None else [float(v) for v in cond_mean],
            "cond_std": None if cond_std is None else [float(v) for v in cond_std],
            "n_blocks": int(n_blocks),
            "hidden": int(hidden),
            "depth": int(depth),
            "n_bins": int(n_bins),
            "tail_bound": float(tail_bound),
            "slope": float(slope),
            "activation": activation,
            "scaling": None if scaling is None else scaling.hparams,
            "mask_seed": int(mask_seed),
            "dtype": _dtype_name(dt),
        }
        self.to(dt)

    @property
    def hparams(self) -> dict[str, Any]:
        """Everything needed to rebuild the flow (``ConditionalFlow(**hparams)`` minus ``kind``);
        ``dtype`` is the current one (``.to(dtype)`` after construction is fine)."""
        return {**self._hparams, "dtype": _dtype_name(self.dtype)}

    @property
    def dtype(self) -> torch.dtype:
        return self.context.mean.dtype

    def _check(self, s: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        dev = self.circular.device
        s = torch.as_tensor(s, dtype=self.dtype, device=dev)
        if s.ndim != 2 or s.shape[1] != self.n_cg:
            raise ValueError(f"s must have shape [B, {self.n_cg}], got {tuple(s.shape)}")
        if x is not None:
            x = torch.as_tensor(x, dtype=self.dtype, device=dev)
            if x.shape != (s.shape[0], self.dim):
                raise ValueError(
                    f"x_fg must have shape [{s.shape[0]}, {self.dim}], got {tuple(x.shape)}"
                )
        return s, x

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``[n, dim]`` of the base: Uniform[-pi, pi) circular, N(0, 1) others."""
        kw = {"dtype": self.dtype, "device": self.circular.device, "generator": generator}
        u = torch.randn(n, self.dim, **kw)
        if len(self.circ_idx):
            r = torch.rand(n, len(self.circ_idx), **kw)
            u[:, self.circ_idx] = wrap_angle((2.0 * r - 1.0) * math.pi)
        return u

    def base_log_prob(self, u: Tensor) -> Tensor:
        """Log density of the base at ``u [B, dim]``."""
        ul = u[:, self.lin_idx]
        lp = -0.5 * (ul * ul).sum(-1) - 0.5 * _LOG_2PI * len(self.lin_idx)
        return lp - _LOG_2PI * len(self.circ_idx)

    def from_base(self, u: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Base ``u`` -> unscaled ``x_FG`` and ``log|det dx/du|`` ``[B]``."""
        s, _ = self._check(s)
        ctx = self.context(s)
        total = u.new_zeros(u.shape[0])
        for layer in self.layers:
            u, ladj = layer(u, ctx)
            total = total + ladj
        if self.scaling is not None:
            u, ladj = self.scaling.inverse(u)
            total = total + ladj
        elif len(self.circ_idx):
            u = torch.where(self.circular, wrap_angle(u), u)
        return u, total

    def to_base(self, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled ``x_FG`` -> base ``u`` and ``log|det du/dx|`` ``[B]``."""
        s, x = self._check(s, x)
        ctx = self.context(s)
        if self.scaling is not None:
            x, total = self.scaling(x)
        else:
            x = torch.where(self.circular, wrap_angle(x), x)
            total = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ladj = layer.inverse(x, ctx)
            total = total + ladj
        return x, total

    def sample(self, s: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One draw per row of ``s [B, n_cg]``: ``x_FG [B, dim]`` (unscaled), ``log q [B]``.

        Reparameterised (differentiable w.r.t. the parameters); circular features in [-pi, pi).
        """
        s, _ = self._check(s)
        u = self.sample_base(s.shape[0], generator)
        x, ladj = self.from_base(u, s)
        return x, self.base_log_prob(u) - ladj

    def log_prob(self, x_fg: Tensor, s: Tensor) -> Tensor:
        """``log q(x_FG | s)`` ``[B]`` (density over unscaled ``x_FG``)."""
        u, ladj = self.to_base(x_fg, s)
        return self.base_log_prob(u) + ladj


# --------------------------------------------------------------------------- 1-D affine
class ConditionalAffine1D(nn.Module):
    """``x = x_mean + x_std (mu(s) + sigma(s) z)``, ``z ~ N(0, 1)``, for one FG feature.

    ``mu``, ``sigma``: MLPs ``[n_cg -> hidden x depth -> 1]`` of the standardised ``s``
    (``cond_mean``/``cond_std``; periodic CG coordinates enter as ``cos, sin``), ``sigma`` via
    softplus. Initialised to ``mu = 0, sigma = 1`` (last layers zero).
    """

    kind = "ConditionalAffine1D"
    dim = 1

    def __init__(
        self,
        n_cg: int = 1,
        cond_mean: Sequence[float] | None = None,
        cond_std: Sequence[float] | None = None,
        cond_periodic: Sequence[bool] | None = None,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "sigmoid",
        x_mean: float = 0.0,
        x_std: float = 1.0,
        dtype: str | torch.dtype = "float64",
    ) -> None:
        super().__init__()
        dt = _dtype(dtype)
        periodic = [False] * n_cg if cond_periodic is None else [bool(p) for p in cond_periodic]
        if len(periodic) != n_cg:
            raise ValueError(f"cond_periodic needs {n_cg} entries")
        if not x_std > 0:
            raise ValueError(f"x_std must be > 0, got {x_std}")
        self.context = _Context(periodic, cond_mean, cond_std)
        self.n_cg = n_cg
        nf = self.context.n_features
        self.mu = _mlp(nf, 1, hidden, depth, activation)
        self.sigma = _mlp(nf, 1, hidden, depth, activation)
        for net, bias in ((self.mu, 0.0), (self.sigma, math.log(math.expm1(1.0)))):
            nn.init.zeros_(net[-1].weight)
            nn.init.constant_(net[-1].bias, bias)
        self.register_buffer("x_mean", torch.tensor(float(x_mean), dtype=torch.float64))
        self.register_buffer("x_std", torch.tensor(float(x_std), dtype=torch.float64))
        self._hparams: dict[str, Any] = {
            "kind": self.kind,
            "n_cg": int(n_cg),
            "cond_mean": None if cond_mean is None else [float(v) for v in cond_mean],
            "cond_std": None if cond_std is None else [float(v) for v in cond_std],
            "cond_periodic": periodic,
            "hidden": int(hidden),
            "depth": int(depth),
            "activation": activation,
            "x_mean": float(x_mean),
            "x_std": float(x_std),
            "dtype": _dtype_name(dt),
        }
        self.to(dt)

    @property
    def hparams(self) -> dict[str, Any]:
        """Everything needed to rebuild the flow; ``dtype`` is the current one."""
        return {**self._hparams, "dtype": _dtype_name(self.dtype)}

    @property
    def dtype(self) -> torch.dtype:
        return self.x_mean.dtype

    def _params(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.as_tensor(s, dtype=self.dtype, device=self.x_mean.device)
        if s.ndim != 2 or s.shape[1] != self.n_cg:
            raise ValueError(f"s must have shape [B, {self.n_cg}], got {tuple(s.shape)}")
        c = self.context(s)
        return s, self.mu(c), nn.functional.softplus(self.sigma(c))

    def _log_normal(self, z: Tensor, sigma: Tensor) -> Tensor:
        lp = -0.5 * z * z - 0.5 * _LOG_2PI - sigma.log() - self.x_std.log()
        return lp.squeeze(-1)

    def sample(self, s: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, 1]`` and ``log q [B]`` (reparameterised)."""
        s, mu, sigma = self._params(s)
        z = torch.randn(s.shape[0], 1, dtype=s.dtype, device=s.device, generator=generator)
        x = self.x_mean + self.x_std * (mu + sigma * z)
        return x, self._log_normal(z, sigma)

    def log_prob(self, x_fg: Tensor, s: Tensor) -> Tensor:
        """``log q(x | s)`` ``[B]``."""
        s, mu, sigma = self._params(s)
        x = torch.as_tensor(x_fg, dtype=self.dtype, device=s.device)
        if x.shape != (s.shape[0], 1):
            raise ValueError(f"x_fg must have shape [{s.shape[0]}, 1], got {tuple(x.shape)}")
        z = ((x - self.x_mean) / self.x_std - mu) / sigma
        return self._log_normal(z, sigma)


Flow = ConditionalFlow | ConditionalAffine1D
_KINDS: dict[str, type[nn.Module]] = {
    ConditionalFlow.kind: ConditionalFlow,
    ConditionalAffine1D.kind: ConditionalAffine1D,
}


# ------------------------------------------------------------------------------ factory
def build_flow(
    system: System,
    kind: str = "auto",
    reference: Tensor | np.ndarray | None = None,
    **hparams: Any,
) -> Flow:
    """A flow for ``system``'s FG coordinates given its CG coordinates.

    ``kind``: ``"spline"`` (:class:`ConditionalFlow`), ``"affine"``
    (:class:`ConditionalAffine1D`, one FG feature) or ``"auto"`` (affine for one FG feature).
    Non-periodic CG coordinates are standardised by ``cond_mean``/``cond_std`` if given, else
    by the centre and the uniform-distribution std of the system's CG bounds. The spline flow
    gets :func:`scaling_for` ``(system, reference)`` unless ``scaling`` is given.
    ``hparams`` go to the constructor.
    """
    fg = list(system.fg_indices)
    circ = system.internal_circular.to(torch.bool)[fg].tolist()
    spec = system.cg_spec
    if "cond_mean" not in hparams:
        hparams["cond_mean"] = [0.5 * (lo + hi) for lo, hi in spec.bounds]
    if "cond_std" not in hparams:
        hparams["cond_std"] = [(hi - lo) / math.sqrt(12.0) for lo, hi in spec.bounds]
    if kind == "auto":
        kind = "affine" if len(fg) == 1 else "spline"
    if kind == "affine":
        if len(fg) != 1 or circ[0]:
            raise ValueError(
                f"affine flow needs exactly one non-circular FG coordinate; system "
                f"{system.name!r} has {len(fg)}"
            )
        return ConditionalAffine1D(n_cg=spec.dim, cond_periodic=list(spec.periodic), **hparams)
    if kind != "spline":
        raise ValueError(f"unknown flow kind {kind!r}; choose 'auto', 'spline' or 'affine'")
    if "scaling" not in hparams:
        hparams["scaling"] = scaling_for(system, reference)
    return ConditionalFlow(dim=len(fg), circular=circ, cond_periodic=list(spec.periodic), **hparams)


# ----------------------------------------------------------------------------- save/load
def _plain(obj: Any, where: str = "extra") -> Any:
    """``obj`` with numpy values turned into Python ones (loadable with ``weights_only``)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if obj is None or isinstance(obj, str | int | float | bool | Tensor):
        return obj
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a flow file")


def save_flow(
    flow: Flow,
    path: str | os.PathLike,
    extra: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write ``flow`` (hparams + state dict), ``extra`` (plain values) and optionally the state of
    its ``optimizer`` (so that the next training phase continues with the same Adam moments, as
    the original code does) to ``path`` atomically."""
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "kind": flow.kind,
        "hparams": flow.hparams,
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "extra": _plain(extra or {}),
    }
    if optimizer is not None:
        payload["optimizer"] = _to_cpu(optimizer.state_dict())
    from .data import atomic_path

    with atomic_path(path) as tmp:  # the umask decides the mode, as for every result file
        torch.save(payload, tmp)


def load_flow(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Flow, dict]:
    """Rebuild a flow written by :func:`save_flow`; returns ``(flow, extra)``."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{path}: not a cgflow flow file (cannot be read by torch.load: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not a cgflow flow file (no {FILE_FORMAT!r} marker)")
    if payload.get("version") != FILE_VERSION:
        raise ValueError(
            f"{path}: flow file version {payload.get('version')}, this cgflow reads {FILE_VERSION}"
        )
    kind = payload.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown flow kind {kind!r}")
    hparams = dict(payload["hparams"])
    hparams.pop("kind", None)
    flow = _KINDS[kind](**hparams)
    flow.load_state_dict(payload["state_dict"])
    return flow.to(map_location), payload["extra"]


def load_optimizer(path: str | os.PathLike, flow: Flow, lr: float) -> torch.optim.Adam:
    """Adam over ``flow``'s parameters, continuing from the state stored in the flow file at
    ``path`` when there is one (moments cast to the parameters' dtype), with learning rate ``lr``.
    On CPU its step is torch's fused kernel (all parameters in one operator call): the same
    arithmetic as the per-parameter loop, with far fewer operator calls for a small flow."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("optimizer") if isinstance(payload, dict) else None
    if state is not None:
        opt.load_state_dict(state)
        for group in opt.param_groups:
            group["lr"] = lr
    if all(p.device.type == "cpu" for p in flow.parameters()):
        for group in opt.param_groups:
            group["foreach"], group["fused"] = False, True
    return opt


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------- internal vectors
def assemble(system: System, s: Tensor, x_fg: Tensor) -> Tensor:
    """Full internal vector ``z [B, n_internal]`` from CG ``s [B, n_cg]`` and ``x_fg [B, n_fg]``."""
    cg, fg = list(system.cg_indices), list(system.fg_indices)
    if s.ndim != 2 or s.shape[1] != len(cg) or x_fg.shape != (s.shape[0], len(fg)):
        raise ValueError(
            f"assemble: need s [B, {len(cg)}] and x_fg [B, {len(fg)}], got {tuple(s.shape)} and "
            f"{tuple(x_fg.shape)}"
        )
    dtype = torch.promote_types(s.dtype, x_fg.dtype)
    z = x_fg.new_zeros(s.shape[0], system.n_internal, dtype=dtype)
    z = z.index_copy(1, torch.tensor(cg, device=z.device), s.to(dtype))
    return z.index_copy(1, torch.tensor(fg, device=z.device), x_fg.to(dtype))


def split(system: System, z: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`assemble`: ``z [B, n_internal]`` -> ``(s, x_fg)``."""
    if z.ndim != 2 or z.shape[1] != system.n_internal:
        raise ValueError(f"split: z must have shape [B, {system.n_internal}], got {tuple(z.shape)}")
    return z[:, list(system.cg_indices)], z[:, list(system.fg_indices)]
