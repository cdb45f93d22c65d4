"""Batched, differentiable torch re-implementation of an OpenMM force field.

:class:`TorchEnergy` is built from an ``openmm.System`` (:meth:`TorchEnergy.from_openmm`) and
evaluates potential energies (kJ/mol) and forces (kJ/mol/nm) of batches ``[B, N, 3]`` of
coordinates (nm) on CPU or GPU, in float32 or float64.

Supported forces (anything else raises :class:`UnsupportedForceError` naming the force):

* ``HarmonicBondForce`` ``0.5 k (r - r0)^2``, ``HarmonicAngleForce`` ``0.5 k (θ - θ0)^2``,
  ``PeriodicTorsionForce`` ``k (1 + cos(n φ - φ0))`` (not with periodic boundary conditions);
* ``NonbondedForce`` with ``NoCutoff``: Coulomb (OpenMM's ``ONE_4PI_EPS0``) and Lorentz-Berthelot
  Lennard-Jones for all non-excluded pairs, exceptions with their own parameters; no parameter
  offsets;
* ``GBSAOBCForce`` (OpenMM's built-in OBC2 with the ACE surface term), ``NoCutoff``; like
  OpenMM's reference implementation it adds the "buried atom" term to the Born integral;
* ``CustomGBForce`` only when recognised, expression by expression, as the Amber OBC1 model of
  ``openmm.app.internal.customgbforces.GBSAOBC1Force`` (no cutoff, no salt, optional ACE);
* ``CMMotionRemover`` is ignored (it adds no energy).

Why by hand: no maintained library computes the Amber OBC1 generalized-Born model batched and
differentiably in torch from an OpenMM ``System``, and the molecules here are small (15-22
atoms), so dense all-pairs arrays over ``[B, P]`` (``P = N (N - 1) / 2`` pairs ``i < j``) are the
fastest layout. Forces come from hand-written analytic derivatives (``energies_and_forces``,
2-3x faster than autograd on CPU); ``energies`` stays differentiable through autograd. Index
gathers/scatters are products with constant 0/±1 matrices (exact, and faster on CPU) unless
float32 matmuls may run in TF32/bfloat16, where index ops are used instead.

The parameters are plain tensors and floats (:meth:`TorchEnergy.save`), so a GPU node without
OpenMM can rebuild the backend with :meth:`TorchEnergy.load`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .base import EnergyBackend

if TYPE_CHECKING:  # pragma: no cover
    import openmm

__all__ = [
    "FORMAT_TAG",
    "ONE_4PI_EPS0",
    "TorchEnergy",
    "UnsupportedForceError",
    "parameters_from_openmm",
]

#: tag stored with saved parameters; bumped when the layout changes
FORMAT_TAG = "cgflow.energy.torch_backend/v1"

# OpenMM 8 derives its Coulomb constant from CODATA 2018 (SimTKOpenMMRealType.h):
# ONE_4PI_EPS0 = 1 / (4 π ε0) in kJ mol^-1 nm e^-2 = 138.93545764438198.
_E_CHARGE = 1.602176634e-19  # C
_AVOGADRO = 6.02214076e23  # 1/mol
_EPSILON0 = 1e-6 * 8.8541878128e-12 / (_E_CHARGE * _E_CHARGE * _AVOGADRO)  # e^2/(kJ/mol nm)
#: Coulomb constant 1/(4 π ε0) in kJ/mol nm/e^2, exactly as OpenMM 8 computes it
ONE_4PI_EPS0 = 1.0 / (4.0 * math.pi * _EPSILON0)

# OpenMM's built-in GBSAOBCForce (OBC2) constants (ReferenceObc / ObcParameters)
_OBC2_ALPHA, _OBC2_BETA, _OBC2_GAMMA = 1.0, 0.8, 4.85
_OBC_DIELECTRIC_OFFSET = 0.009  # nm
_ACE_PROBE_RADIUS = 0.14  # nm
# Amber OBC1 (igb=2) tanh coefficients as written by customgbforces.GBSAOBC1Force
_OBC1_ALPHA, _OBC1_GAMMA = 0.8, 2.909125

_NONBONDED_METHODS = {
    0: "NoCutoff",
    1: "CutoffNonPeriodic",
    2: "CutoffPeriodic",
    3: "Ewald",
    4: "PME",
    5: "LJPME",
}

# term names in ``terms()``: the OpenMM force class they come from
_BOND, _ANGLE, _TORSION, _NONBONDED = (
    "HarmonicBondForce",
    "HarmonicAngleForce",
    "PeriodicTorsionForce",
    "NonbondedForce",
)


class UnsupportedForceError(ValueError):
    """The System holds a force (or force setting) this backend cannot reproduce."""


# ----------------------------------------------------------------------------------------------
# Extraction of plain parameters from an openmm.System (the only place that imports openmm)
# ----------------------------------------------------------------------------------------------


def _strip(value: Any, unit: Any) -> float:
    """A float in ``unit`` from a Quantity (or a plain number, already in OpenMM units)."""
    if hasattr(value, "value_in_unit"):
        return float(value.value_in_unit(unit))
    return float(value)


def _pair_index(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Index of pair ``(min, max)`` in the row-major list of pairs ``i < j`` of ``n`` atoms."""
    a, b = np.minimum(i, j), np.maximum(i, j)
    return a * n - a * (a + 1) // 2 + (b - a - 1)


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major pairs ``i < j`` of ``n`` atoms."""
    i, j = np.triu_indices(n, k=1)
    return i.astype(np.int64), j.astype(np.int64)


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_OBC1_I = (
    "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0);"
    "U=r+sr2;L=max(or1,D);D=abs(r-sr2)"
)
_OBC1_B = re.compile(
    re.escape("1/(1/or-tanh(")
    + _NUM
    + re.escape("*psi+")
    + _NUM
    + re.escape("*psi^3)/radius);psi=I*or;radius=or+offset;offset=")
    + _NUM
)
_GB_SUFFIX = (
    re.escape(";solventDielectric=")
    + _NUM
    + re.escape(";soluteDielectric=")
    + _NUM
    + re.escape(";kappa=")
    + _NUM
    + re.escape(";offset=")
    + _NUM
)
_OBC1_SELF = re.compile(
    re.escape("-0.5*")
    + _NUM
    + re.escape("*(1/soluteDielectric-1/solventDielectric)*charge^2/B")
    + _GB_SUFFIX
)
_OBC1_ACE = re.compile(
    _NUM
    + re.escape("*(radius+")
    + _NUM
    + re.escape(")^2*(radius/B)^6;radius=or+offset")
    + _GB_SUFFIX
)
_OBC1_PAIR = re.compile(
    re.escape("-")
    + _NUM
    + re.escape(
        "*(1/soluteDielectric-1/solventDielectric)*charge1*charge2/f;"
        "f=sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))"
    )
    + _GB_SUFFIX
)


def _squeeze(expression: str) -> str:
    return re.sub(r"\s+", "", expression)


def _reject_gb(reason: str) -> UnsupportedForceError:
    return UnsupportedForceError(f"CustomGBForce not recognised as Amber OBC1 ({reason})")


def _custom_obc1(force: Any, n_atoms: int) -> dict[str, Any]:
    """GB block of a CustomGBForce that is exactly Amber OBC1 (``GBSAOBC1Force``), else raise."""
    import openmm

    gb = openmm.CustomGBForce
    if force.getNonbondedMethod() != gb.NoCutoff:
        raise _reject_gb(
            f"nonbonded method {force.getNonbondedMethod()}: a cutoff is not supported"
        )
    if force.getNumGlobalParameters() or force.getNumEnergyParameterDerivatives():
        raise _reject_gb("it has global parameters")
    if force.getNumExclusions():
        raise _reject_gb("it has exclusions")
    if force.getNumTabulatedFunctions():
        raise _reject_gb("it uses tabulated functions, e.g. GBn/GBn2")
    names = [
        force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())
    ]
    if names != ["charge", "or", "sr"]:
        raise _reject_gb(f"per-particle parameters {names}, expected ['charge', 'or', 'sr']")
    if force.getNumComputedValues() != 2:
        raise _reject_gb(f"{force.getNumComputedValues()} computed values, expected I and B")
    name_i, expr_i, type_i = force.getComputedValueParameters(0)
    name_b, expr_b, type_b = force.getComputedValueParameters(1)
    if (name_i, type_i, _squeeze(expr_i)) != ("I", gb.ParticlePairNoExclusions, _OBC1_I):
        raise _reject_gb(f"computed value {name_i}={expr_i!r} is not the OBC Born integral (GBn?)")
    match_b = _OBC1_B.fullmatch(_squeeze(expr_b))
    if name_b != "B" or type_b != gb.SingleParticle or match_b is None:
        raise _reject_gb(f"computed value {name_b}={expr_b!r} is not the OBC Born radius")
    alpha, gamma, offset_b = (float(v) for v in match_b.groups())
    if not (math.isclose(alpha, _OBC1_ALPHA) and math.isclose(gamma, _OBC1_GAMMA)):
        raise _reject_gb(f"Born radius coefficients {alpha}, {gamma} are not OBC1's")

    found: dict[str, tuple[float, ...]] = {}
    for k in range(force.getNumEnergyTerms()):
        expression, kind = force.getEnergyTermParameters(k)
        text = _squeeze(expression)
        if "kappa*" in text:
            raise _reject_gb("salt screening (kappa > 0) is not supported")
        if "cutoff" in text:
            raise _reject_gb("a cutoff is not supported")
        for label, pattern, wanted in (
            ("self", _OBC1_SELF, gb.SingleParticle),
            ("ace", _OBC1_ACE, gb.SingleParticle),
            ("pair", _OBC1_PAIR, gb.ParticlePairNoExclusions),
        ):
            match = pattern.fullmatch(text)
            if match is not None and kind == wanted and label not in found:
                found[label] = tuple(float(v) for v in match.groups())
                break
        else:
            raise _reject_gb(f"energy term {expression!r} (type {kind}) is not an OBC1 term")
    if "self" not in found or "pair" not in found:
        raise _reject_gb("the self or the pair energy term is missing")
    coulomb = found["self"][0]
    solvent, solute, kappa, offset_e = found["self"][1:]
    for label, values in found.items():
        if values[-4:] != (solvent, solute, kappa, offset_e):
            raise _reject_gb(f"the {label} term has different dielectrics/kappa/offset")
    if found["pair"][0] != coulomb:
        raise _reject_gb("self and pair terms use different Coulomb constants")
    if kappa != 0.0:
        raise _reject_gb(f"kappa={kappa}: salt screening is not supported")

    params = np.array([force.getParticleParameters(a) for a in range(n_atoms)], dtype=np.float64)
    if params.shape != (n_atoms, 3):
        raise _reject_gb("it does not hold one parameter set per particle")
    charge, offset_radius, scaled_radius = params.T
    surface, probe = (found["ace"][0], found["ace"][1]) if "ace" in found else (0.0, 0.0)
    return {
        "name": "CustomGBForce",
        "charge": charge,
        "offset_radius": offset_radius,
        "scaled_radius": scaled_radius,
        "tanh_radius": offset_radius + offset_b,
        "ace_radius": offset_radius + offset_e,
        "alpha": _OBC1_ALPHA,
        "beta": 0.0,
        "gamma": _OBC1_GAMMA,
        "prefactor": -coulomb * (1.0 / solute - 1.0 / solvent),
        "surface_coefficient": surface,
        "probe_radius": probe,
        "buried_correction": False,
    }


def _builtin_obc2(force: Any, n_atoms: int) -> dict[str, Any]:
    """GB block of OpenMM's built-in ``GBSAOBCForce`` (OBC2 + ACE, NoCutoff)."""
    import openmm
    from openmm import unit

    method = force.getNonbondedMethod()
    if method != openmm.GBSAOBCForce.NoCutoff:
        raise UnsupportedForceError(
            f"GBSAOBCForce with nonbonded method {method}: only NoCutoff is supported"
        )
    charge, radius, scale = np.zeros(n_atoms), np.zeros(n_atoms), np.zeros(n_atoms)
    for a in range(n_atoms):
        q, rad, s = force.getParticleParameters(a)
        charge[a] = _strip(q, unit.elementary_charge)
        radius[a] = _strip(rad, unit.nanometer)
        scale[a] = float(s)
    solute, solvent = force.getSoluteDielectric(), force.getSolventDielectric()
    prefactor = 0.0
    if solute != 0.0 and solvent != 0.0:
        prefactor = -ONE_4PI_EPS0 * (1.0 / solute - 1.0 / solvent)
    sa = _strip(force.getSurfaceAreaEnergy(), unit.kilojoule_per_mole / unit.nanometer**2)
    offset_radius = radius - _OBC_DIELECTRIC_OFFSET
    return {
        "name": "GBSAOBCForce",
        "charge": charge,
        "offset_radius": offset_radius,
        "scaled_radius": offset_radius * scale,
        "tanh_radius": radius,
        "ace_radius": radius,
        "alpha": _OBC2_ALPHA,
        "beta": _OBC2_BETA,
        "gamma": _OBC2_GAMMA,
        "prefactor": prefactor,
        "surface_coefficient": 4.0 * math.pi * sa,
        "probe_radius": _ACE_PROBE_RADIUS,
        "buried_correction": True,
    }


def _nonbonded(force: Any, n_atoms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pair ``(4 ε σ^12, 4 ε σ^6, ONE_4PI_EPS0 q_i q_j)`` over all pairs ``i < j``."""
    import openmm
    from openmm import unit

    method = force.getNonbondedMethod()
    if method != openmm.NonbondedForce.NoCutoff:
        name = _NONBONDED_METHODS.get(method, str(method))
        raise UnsupportedForceError(
            f"NonbondedForce with method {name} is not supported (only NoCutoff)"
        )
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise UnsupportedForceError(
            "NonbondedForce with particle/exception parameter offsets (global parameters) "
            "is not supported"
        )
    if hasattr(force, "getIncludeDirectSpace") and not force.getIncludeDirectSpace():
        raise UnsupportedForceError("NonbondedForce without direct space is not supported")
    e, nm, kj = unit.elementary_charge, unit.nanometer, unit.kilojoule_per_mole
    q, sigma, eps = np.zeros(n_atoms), np.zeros(n_atoms), np.zeros(n_atoms)
    for a in range(n_atoms):
        qa, sa, ea = force.getParticleParameters(a)
        q[a], sigma[a], eps[a] = _strip(qa, e), _strip(sa, nm), _strip(ea, kj)
    pi, pj = _all_pairs(n_atoms)
    qq = q[pi] * q[pj]
    sig = 0.5 * (sigma[pi] + sigma[pj])
    epsilon = np.sqrt(eps[pi] * eps[pj])
    for k in range(force.getNumExceptions()):
        i, j, cp, s, ep = force.getExceptionParameters(k)
        if i == j:
            continue
        p = int(_pair_index(np.array(i), np.array(j), n_atoms))
        qq[p], sig[p], epsilon[p] = _strip(cp, e * e), _strip(s, nm), _strip(ep, kj)
    sig6 = sig**6
    return 4.0 * epsilon * sig6 * sig6, 4.0 * epsilon * sig6, ONE_4PI_EPS0 * qq


def parameters_from_openmm(system: openmm.System) -> dict[str, Any]:
    """Plain parameters (numpy float64/int64 arrays, floats) of a supported ``openmm.System``."""
    import openmm
    from openmm import unit

    n = system.getNumParticles()
    for a in range(n):
        if system.isVirtualSite(a):
            raise UnsupportedForceError(f"virtual sites are not supported (particle {a})")
    nm, kj, rad = unit.nanometer, unit.kilojoule_per_mole, unit.radian
    bonds: list[tuple[int, int, float, float]] = []
    angles: list[tuple[int, int, int, float, float]] = []
    torsions: list[tuple[int, int, int, int, float, float, float]] = []
    n_pairs = n * (n - 1) // 2
    lj12, lj6, coulomb = np.zeros(n_pairs), np.zeros(n_pairs), np.zeros(n_pairs)
    has_nonbonded = False
    gb_blocks: list[dict[str, Any]] = []
    order: list[str] = []
    for force in system.getForces():
        name = type(force).__name__
        if isinstance(force, openmm.CMMotionRemover):
            continue
        bonded = (openmm.HarmonicBondForce, openmm.HarmonicAngleForce, openmm.PeriodicTorsionForce)
        if isinstance(force, bonded) and force.usesPeriodicBoundaryConditions():
            raise UnsupportedForceError(
                f"{name} with periodic boundary conditions is not supported"
            )
        if isinstance(force, openmm.HarmonicBondForce):
            for k in range(force.getNumBonds()):
                i, j, r0, kb = force.getBondParameters(k)
                bonds.append((i, j, _strip(r0, nm), _strip(kb, kj / nm**2)))
        elif isinstance(force, openmm.HarmonicAngleForce):
            for k in range(force.getNumAngles()):
                i, j, l, t0, ka = force.getAngleParameters(k)
                angles.append((i, j, l, _strip(t0, rad), _strip(ka, kj / rad**2)))
        elif isinstance(force, openmm.PeriodicTorsionForce):
            for k in range(force.getNumTorsions()):
                i, j, l, m, per, phase, kt = force.getTorsionParameters(k)
                torsions.append((i, j, l, m, float(per), _strip(phase, rad), _strip(kt, kj)))
        elif isinstance(force, openmm.NonbondedForce):
            a12, a6, kq = _nonbonded(force, n)
            lj12 += a12
            lj6 += a6
            coulomb += kq
            has_nonbonded = True
        elif isinstance(force, openmm.GBSAOBCForce):
            gb_blocks.append(_builtin_obc2(force, n))
        elif isinstance(force, openmm.CustomGBForce):
            gb_blocks.append(_custom_obc1(force, n))
        else:
            raise UnsupportedForceError(f"{name} is not supported by the torch energy backend")
        if name not in order:
            order.append(name)

    bond_arr = np.array(bonds, dtype=np.float64).reshape(-1, 4)
    angle_arr = np.array(angles, dtype=np.float64).reshape(-1, 5)
    torsion_arr = np.array(torsions, dtype=np.float64).reshape(-1, 7)
    params: dict[str, Any] = {
        "n_atoms": n,
        "term_order": order,
        "bond_index": bond_arr[:, :2].astype(np.int64),
        "bond_r0": bond_arr[:, 2],
        "bond_k": bond_arr[:, 3],
        "angle_index": angle_arr[:, :3].astype(np.int64),
        "angle_theta0": angle_arr[:, 3],
        "angle_k": angle_arr[:, 4],
        "torsion_index": torsion_arr[:, :4].astype(np.int64),
        "torsion_periodicity": torsion_arr[:, 4],
        "torsion_phase": torsion_arr[:, 5],
        "torsion_k": torsion_arr[:, 6],
        "gb": gb_blocks,
    }
    if has_nonbonded:
        params.update(pair_lj12=lj12, pair_lj6=lj6, pair_coulomb=coulomb)
    return params


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {dtype!r}")
    return resolved


def _plain(value: Any) -> Any:
    """Parameters as CPU float64/int64 tensors, floats, ints, strings, lists and dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str | Mapping) for v in value):
        return [_plain(v) for v in value]
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    tensor = tensor.detach().cpu()
    return tensor.to(torch.float64) if tensor.is_floating_point() else tensor.to(torch.int64)


def _one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[len(index), n]`` float64 matrix with 1 at ``(k, index[k])``."""
    m = torch.zeros(index.numel(), n, dtype=torch.float64)
    m[torch.arange(index.numel()), index] = 1.0
    return m


def _exact_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` run in IEEE precision (no TF32 / bfloat16)."""
    try:
        if device.type == "cuda":
            flags: Any = torch.backends.cuda.matmul
            if flags.allow_tf32:
                return False
        elif device.type == "cpu":
            flags = getattr(torch.backends.mkldnn, "matmul", None)
        else:
            return False
        precision = getattr(flags, "fp32_precision", None)
        if precision is None:  # torch without the per-backend precision API
            return torch.get_float32_matmul_precision() == "highest"
        if precision == "none":  # inherits the global setting
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision in ("none", "ieee")
    except RuntimeError:  # e.g. torch refusing a mix of the legacy and the new precision API
        return False


def _matmul_is_exact(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products with 0/±1 matrices are exact gathers for ``dtype`` on ``device``."""
    return dtype == torch.float64 or _exact_float32_matmul(device)


class _Incidence:
    """Constant ``[K, n]`` matrix ``M`` with ``+1`` at ``plus[k]`` and ``-1`` at ``minus[k]``.

    ``gather(x) = x M^T`` (``y_k = x_plus - x_minus``) and ``scatter(g) = g M`` (its adjoint),
    for 2-D ``x [R, n]`` and ``g [R, K]``. With ``matmul`` they are products with the dense
    0/±1 matrix: exact (a single rounding, as in a subtraction) when matmuls run in IEEE
    precision, and several times faster on CPU than ``index_select``/``index_add``, the
    fallback (autograd-safe, used under TF32/bfloat16 matmul settings).
    """

    def __init__(self, plus: torch.Tensor, minus: torch.Tensor | None, n: int, **to: Any) -> None:
        self.n = n
        self.plus = plus.reshape(-1).to(to["device"])
        self.minus = None if minus is None else minus.reshape(-1).to(to["device"])
        m = _one_hot(plus.reshape(-1), n)
        if minus is not None:
            m = m - _one_hot(minus.reshape(-1), n)
        self.gather_matrix = m.T.contiguous().to(**to)  # [n, K]
        self.scatter_matrix = m.contiguous().to(**to)  # [K, n]

    def gather(self, x: torch.Tensor, matmul: bool) -> torch.Tensor:
        if matmul:
            return x @ self.gather_matrix
        y = x.index_select(1, self.plus)
        return y if self.minus is None else y - x.index_select(1, self.minus)

    def scatter(self, g: torch.Tensor, matmul: bool) -> torch.Tensor:
        if matmul:
            return g @ self.scatter_matrix
        out = g.new_zeros(g.shape[0], self.n).index_add(1, self.plus, g)
        return out if self.minus is None else out.index_add(1, self.minus, g, alpha=-1)


class _GBBlock:
    """One generalized-Born (OBC) force on device, with per-pair constants precomputed."""

    def __init__(
        self, p: Mapping[str, Any], n: int, pi: torch.Tensor, pj: torch.Tensor, **to: Any
    ) -> None:
        self.name = str(p["name"])

        def t(key: str) -> torch.Tensor:
            value = torch.as_tensor(p[key], dtype=torch.float64)
            if value.shape != (n,):
                raise ValueError(f"{self.name}: {key} has shape {tuple(value.shape)}, not ({n},)")
            return value

        q, orad, srad = t("charge"), t("offset_radius"), t("scaled_radius")
        self.alpha, self.beta, self.gamma = float(p["alpha"]), float(p["beta"]), float(p["gamma"])
        self.buried = bool(p["buried_correction"])
        prefactor = float(p["prefactor"])
        ace_radius = t("ace_radius")
        surface = float(p["surface_coefficient"])
        probe = float(p["probe_radius"])
        # ordered pairs (receiver, sender): (i, j) in row 0 and (j, i) in row 1, [2, P]
        self.recv_or = torch.stack([orad[pi], orad[pj]]).to(**to)
        send_sr = torch.stack([srad[pj], srad[pi]])
        self.send_sr = send_sr.to(**to)
        self.send_sr2 = (send_sr * send_sr).to(**to)
        self.inv_recv_or = (1.0 / torch.stack([orad[pi], orad[pj]])).to(**to)
        self.or_ = orad.to(**to)
        self.inv_or = (1.0 / orad).to(**to)
        self.inv_tanh_radius = (1.0 / t("tanh_radius")).to(**to)
        self.self_coef = (0.5 * prefactor * q * q).to(**to)  # E_self = self_coef / B
        self.has_ace = surface != 0.0
        self.ace_coef = (surface * (ace_radius + probe) ** 2 * ace_radius**6).to(**to)  # / B^6
        self.pair_coef = (prefactor * q[pi] * q[pj]).to(**to)  # E_pair = pair_coef / f
        # ordered pair -> receiving atom: scatter sums onto atoms, gather reads atom values
        self.receivers = _Incidence(torch.cat([pi, pj]), None, n, **to)


class TorchEnergy(EnergyBackend):
    """Batched energies (kJ/mol) and forces (kJ/mol/nm) of an OpenMM force field in torch.

    ``params`` is the plain dict of :func:`parameters_from_openmm` (numpy arrays or tensors);
    ``chunk_size`` bounds the number of configurations evaluated at once (memory, cache).
    Attributes: ``n_atoms``, ``device``, ``dtype``, ``term_names`` (keys of :meth:`terms`).

    Non-finite configurations get NaN energies/forces and do not affect the other rows. On a
    shared CPU, run with ``torch.set_num_threads(1)`` per process: the many small ops of one
    evaluation are then much faster than with threads competing for busy cores.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        *,
        chunk_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self._params = _plain(dict(params))
        p = self._params
        to = {"device": self.device, "dtype": self.dtype}
        n = self.n_atoms = int(p["n_atoms"])
        self.term_names: list[str] = list(p.get("term_order", []))

        pi_np, pj_np = _all_pairs(n)
        pi, pj = torch.from_numpy(pi_np), torch.from_numpy(pj_np)
        n_pairs = pi.numel()
        self._pairs = _Incidence(pj, pi, n, **to)  # x_j - x_i

        bidx = p["bond_index"].reshape(-1, 2)
        if bool((bidx[:, 0] == bidx[:, 1]).any()):
            raise ValueError("a bond joins an atom to itself")
        self._n_bonds = bidx.shape[0]
        bond_pair = torch.from_numpy(_pair_index(bidx[:, 0].numpy(), bidx[:, 1].numpy(), n))
        self._bonds = _Incidence(bond_pair, None, n_pairs, **to)  # bond -> its pair
        self._bond_k, self._bond_r0 = p["bond_k"].to(**to), p["bond_r0"].to(**to)

        aidx = p["angle_index"].reshape(-1, 3)
        self._n_angles = aidx.shape[0]
        ai, aj, ak = aidx.T
        self._angles_map = _Incidence(torch.cat([ai, ak]), torch.cat([aj, aj]), n, **to)  # u, v
        self._angle_k, self._angle_theta0 = p["angle_k"].to(**to), p["angle_theta0"].to(**to)

        tidx = p["torsion_index"].reshape(-1, 4)
        self._n_torsions = tidx.shape[0]
        quads, term_quad = tidx, torch.arange(self._n_torsions)
        if self._n_torsions:  # terms sharing one dihedral (several periodicities) share geometry
            quads, term_quad = torch.unique(tidx, dim=0, return_inverse=True)
        ti, tj, tk, tl = quads.T
        # b1 = x_j - x_i, b2 = x_k - x_j, b3 = x_l - x_k
        self._torsions_map = _Incidence(torch.cat([tj, tk, tl]), torch.cat([ti, tj, tk]), n, **to)
        self._terms_map = _Incidence(term_quad, None, quads.shape[0], **to)  # term -> dihedral
        self._torsion_k = p["torsion_k"].to(**to)
        self._torsion_n = p["torsion_periodicity"].to(**to)
        self._torsion_phase = p["torsion_phase"].to(**to)

        self._has_nonbonded = "pair_lj12" in p
        if self._has_nonbonded:
            self._lj12 = p["pair_lj12"].to(**to)
            self._lj6 = p["pair_lj6"].to(**to)
            self._coulomb = p["pair_coulomb"].to(**to)
            if self._lj12.numel() != n_pairs:
                raise ValueError("pair parameter arrays do not match n_atoms")
        self._gb = [_GBBlock(block, n, pi, pj, **to) for block in p.get("gb", [])]
        for name, present in (
            (_BOND, self._n_bonds),
            (_ANGLE, self._n_angles),
            (_TORSION, self._n_torsions),
            (_NONBONDED, self._has_nonbonded),
            *((b.name, True) for b in self._gb),
        ):
            if present and name not in self.term_names:
                self.term_names.append(name)

    # -- construction, persistence ------------------------------------------------------------

    @classmethod
    def from_openmm(
        cls,
        system: openmm.System,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        **options: Any,
    ) -> TorchEnergy:
        """Backend of an ``openmm.System`` (raises :class:`UnsupportedForceError`)."""
        return cls(parameters_from_openmm(system), device=device, dtype=dtype, **options)

    @property
    def params(self) -> dict[str, Any]:
        """The plain parameters (CPU float64/int64 tensors, floats) this backend was built from."""
        return self._params

    def save(self, path: str | Path) -> None:
        """Write the parameters with ``torch.save`` (plain tensors/floats and a format tag)."""
        torch.save({"format": FORMAT_TAG, "params": self._params}, Path(path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        **options: Any,
    ) -> TorchEnergy:
        """Rebuild a backend saved with :meth:`save` (does not need OpenMM)."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_TAG:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(
                f"{path}: not a TorchEnergy parameter file ({found!r} != {FORMAT_TAG})"
            )
        return cls(blob["params"], device=device, dtype=dtype, **options)

    # -- public evaluation ----------------------------------------------------------------------

    def energies(self, x: Any) -> torch.Tensor:
        """Potential energies ``U[B]`` (kJ/mol) of ``x`` (nm, ``[B, N, 3]`` or ``[B, 3N]``).

        Differentiable w.r.t. ``x`` when ``x`` is a tensor that requires grad.
        """
        xb = self._prepare(x)
        if torch.is_grad_enabled() and xb.requires_grad:
            return self._differentiable_energies(xb)
        with torch.no_grad():
            u, _, _ = self._batched(xb, forces=False, want_terms=False)
        return u

    def energies_and_forces(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached energies ``U[B]`` (kJ/mol) and forces ``-dU/dx`` (kJ/mol/nm, shape of ``x``)."""
        xb = self._prepare(x)
        with torch.no_grad():
            u, f, _ = self._batched(xb.detach(), forces=True, want_terms=False)
        assert f is not None
        return u, f.reshape(xb.shape[0], *tuple(x.shape[1:]))

    def terms(self, x: Any) -> dict[str, torch.Tensor]:
        """Per-force energy terms (kJ/mol), keyed by OpenMM force class, e.g. ``NonbondedForce``."""
        xb = self._prepare(x)
        with torch.no_grad():
            _, _, terms = self._batched(xb.detach(), forces=False, want_terms=True)
        return terms

    # -- internals ------------------------------------------------------------------------------

    def _prepare(self, x: Any) -> torch.Tensor:
        """``x`` as a ``[B, N, 3]`` tensor of the backend's dtype on its device."""
        if not torch.is_tensor(x):
            x = torch.as_tensor(np.asarray(x))
        n = self.n_atoms
        if x.ndim == 2 and x.shape[1] == 3 * n:
            x = x.reshape(x.shape[0], n, 3)
        if x.is_floating_point() and torch.finfo(x.dtype).eps < torch.finfo(self.dtype).eps:
            # the energy is translation invariant: centring in the input's precision before
            # rounding to the backend's dtype shrinks |x| and so the rounding error
            x = x - x.mean(dim=-2, keepdim=True)
        x = x.to(device=self.device, dtype=self.dtype)
        if x.ndim != 3 or x.shape[1:] != (n, 3):
            raise ValueError(
                f"expected coordinates [B, {n}, 3] or [B, {3 * n}], got {tuple(x.shape)}"
            )
        return x

    @staticmethod
    def _sanitise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replace non-finite rows by a finite row of the batch (detached); their mask."""
        good = torch.isfinite(x).flatten(1).all(dim=1)
        if bool(good.all()):
            return x, None
        if not bool(good.any()):
            return torch.zeros_like(x), good
        safe = x[int(torch.nonzero(good)[0, 0])].detach()
        return torch.where(good[:, None, None], x, safe), good

    def _differentiable_energies(self, x: torch.Tensor) -> torch.Tensor:
        xs, good = self._sanitise(x)
        parts = []
        for start in range(0, xs.shape[0], self.chunk_size):
            terms, _ = self._forward(xs[start : start + self.chunk_size], forces=False)
            parts.append(sum(terms.values(), torch.zeros((), device=x.device, dtype=x.dtype)))
        u = torch.cat(parts) if parts else x.new_zeros(0)
        if good is not None:
            u = torch.where(good, u, torch.full_like(u, math.nan))
        return u

    def _batched(
        self, x: torch.Tensor, forces: bool, want_terms: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Chunked evaluation without autograd; NaN rows for non-finite input."""
        b = x.shape[0]
        xs, good = self._sanitise(x)
        u = x.new_zeros(b)
        f = x.new_zeros(b, self.n_atoms, 3) if forces else None
        terms = {name: x.new_zeros(b) for name in self.term_names} if want_terms else {}
        for start in range(0, b, self.chunk_size):
            stop = min(start + self.chunk_size, b)
            parts, grad = self._forward(xs[start:stop], forces=forces)
            total = u[start:stop]
            for name, value in parts.items():
                total += value
                if want_terms:
                    terms[name][start:stop] = value
            if f is not None and grad is not None:
                f[start:stop] = -grad.permute(1, 2, 0)
        if good is not None:
            bad = ~good
            u[bad] = math.nan
            if f is not None:
                f[bad] = math.nan
            for value in terms.values():
                value[bad] = math.nan
        return u, f, terms

    def _forward(
        self, x: torch.Tensor, forces: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Energy terms ``{name: [b]}`` and, if ``forces``, ``dU/dx`` as ``[3, b, N]``.

        Coordinates are handled as ``[3, b, ...]`` so that each Cartesian component is a
        contiguous block. Without ``forces`` only out-of-place ops are used (autograd-safe).
        """
        b = x.shape[0]
        mm = _matmul_is_exact(self.dtype, self.device)
        xt = x.permute(2, 0, 1).reshape(3 * b, self.n_atoms)  # [3b, N]
        terms: dict[str, torch.Tensor] = {}
        d = self._pairs.gather(xt, mm).reshape(3, b, -1)  # [3, b, P]: x_j - x_i
        r2 = _dot(d, d)  # [b, P]
        inv_r = torch.rsqrt(r2)
        r = r2 * inv_r
        dedr = torch.zeros_like(r2) if forces else None  # dU/dr per pair
        grad = None  # dU/dx [3b, N]

        def add(name: str, value: torch.Tensor) -> None:
            terms[name] = terms[name] + value if name in terms else value

        if self._n_bonds:
            dr = self._bonds.gather(r, mm) - self._bond_r0
            kdr = self._bond_k * dr
            add(_BOND, 0.5 * (kdr * dr).sum(dim=1))
            if dedr is not None:
                dedr += self._bonds.scatter(kdr, mm)

        if self._has_nonbonded:
            inv_r6 = (inv_r * inv_r) ** 3
            e12 = self._lj12 * inv_r6 * inv_r6
            e6 = self._lj6 * inv_r6
            ec = self._coulomb * inv_r
            add(_NONBONDED, (e12 - e6 + ec).sum(dim=1))
            if dedr is not None:
                dedr += (6.0 * e6 - 12.0 * e12 - ec) * inv_r

        for block in self._gb:
            add(block.name, self._gb_energy(block, r, r2, inv_r, dedr, mm))

        if self._n_angles:
            energy, grad = self._angles(xt, b, forces, mm)
            add(_ANGLE, energy)
        if self._n_torsions:
            energy, g = self._torsions(xt, b, forces, mm)
            add(_TORSION, energy)
            if g is not None:
                grad = g if grad is None else grad + g

        if dedr is not None:
            w = ((dedr * inv_r) * d).reshape(3 * b, -1)  # dU/dd per pair component
            pair_grad = self._pairs.scatter(w, mm)
            grad = pair_grad if grad is None else grad + pair_grad
        if forces and grad is None:
            grad = torch.zeros_like(xt)
        return terms, None if grad is None else grad.reshape(3, b, -1)

    def _gb_energy(
        self,
        gb: _GBBlock,
        r: torch.Tensor,
        r2: torch.Tensor,
        inv_r: torch.Tensor,
        dedr: torch.Tensor | None,
        mm: bool,
    ) -> torch.Tensor:
        """OBC energy (self + ACE + pair) of one GB block; adds its dU/dr to ``dedr``.

        Born integral of receiver a from sender s at distance r (``g`` below, OpenMM/Amber)::

            g = ½ [1/L - 1/U + ¼ (r - s²/r)(1/U² - 1/L²) + ½ ln(L/U)/r]   if r + s >= a,
            U = r + s, L = max(a, |r - s|)  (+ 1/a - 1/L if a < s - r, built-in OBC2 only);
            B = 1 / (1/a - tanh(α ψ - β ψ² + γ ψ³)/ρ),  ψ = a Σ g,  ρ = a + offset.
        """
        b, n_pairs = r.shape
        rr = r.unsqueeze(1)  # [b, 1, P] against [2, P] ordered-pair constants
        ir = inv_r.unsqueeze(1)
        a, s, s2 = gb.recv_or, gb.send_sr, gb.send_sr2
        upper = rr + s  # U
        diff = rr - s
        lower = torch.maximum(diff.abs(), a)  # L
        i_u = 1.0 / upper
        i_l = 1.0 / lower
        i_u2, i_l2 = i_u * i_u, i_l * i_l
        log_lu = torch.log(lower * i_u)
        q = rr - s2 * ir
        g = 0.5 * (i_l - i_u + 0.25 * q * (i_u2 - i_l2) + 0.5 * log_lu * ir)
        active = upper >= a
        if gb.buried:
            buried = a < -diff
            g = g + torch.where(buried, gb.inv_recv_or - i_l, 0.0)
        g = torch.where(active, g, 0.0)
        born_integral = gb.receivers.scatter(g.reshape(b, 2 * n_pairs), mm)  # I  [b, N]
        psi = born_integral * gb.or_
        th = torch.tanh(psi * (gb.alpha + psi * (gb.gamma * psi - gb.beta)))
        inv_born = gb.inv_or - th * gb.inv_tanh_radius  # 1/B  [b, N]
        born = 1.0 / inv_born
        energy = (gb.self_coef * inv_born).sum(dim=1)
        if gb.has_ace:
            inv_born6 = inv_born**6
            energy = energy + (gb.ace_coef * inv_born6).sum(dim=1)
        b_ij = gb.receivers.gather(born, mm).reshape(b, 2, n_pairs)
        b_i, b_j = b_ij[:, 0], b_ij[:, 1]  # [b, P]
        bb = b_i * b_j
        x4 = r2 / (4.0 * bb)
        ex = torch.exp(-x4)
        inv_f = torch.rsqrt(r2 + bb * ex)  # 1/f, f = sqrt(r² + B_i B_j exp(-r²/(4 B_i B_j)))
        e_pair = gb.pair_coef * inv_f
        energy = energy + e_pair.sum(dim=1)
        if dedr is None:
            return energy

        # dU/dB_n from the self, ACE and pair terms
        de_db = -gb.self_coef * inv_born * inv_born
        if gb.has_ace:
            de_db = de_db - 6.0 * gb.ace_coef * inv_born6 * inv_born
        inv_f2 = inv_f * inv_f
        h = -0.5 * e_pair * inv_f2 * ex * (1.0 + x4)  # dE_pair/dB_i = h B_j
        de_db += gb.receivers.scatter(torch.cat([h * b_j, h * b_i], dim=1), mm)
        dedr += -e_pair * inv_f2 * (1.0 - 0.25 * ex) * r
        # dU/dI_n = dU/dB_n dB_n/dI_n, then onto the ordered-pair integrals g(r)
        dt_dpsi = gb.alpha + psi * (3.0 * gb.gamma * psi - 2.0 * gb.beta)
        lam = de_db * born * born * gb.inv_tanh_radius * (1.0 - th * th) * dt_dpsi * gb.or_
        dl = torch.where(diff.abs() > a, torch.sign(diff), 0.0)  # dL/dr
        dg = 0.5 * (
            i_u2
            - i_l2 * dl
            + 0.25 * (1.0 + s2 * ir * ir) * (i_u2 - i_l2)
            + 0.5 * q * (i_l2 * i_l * dl - i_u2 * i_u)
            + 0.5 * ir * (dl * i_l - i_u - log_lu * ir)
        )
        if gb.buried:
            dg = dg + torch.where(buried, i_l2 * dl, 0.0)
        dg = torch.where(active, dg, 0.0)
        lam_pairs = gb.receivers.gather(lam, mm).reshape(b, 2, n_pairs)
        dedr += (lam_pairs * dg).sum(dim=1)
        return energy

    def _angles(
        self, xt: torch.Tensor, b: int, forces: bool, mm: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Harmonic angle energy [b] and dU/dx [3b, N]; θ = atan2(|u×v|, u·v)."""
        uv_pack = self._angles_map.gather(xt, mm).reshape(3, b, 2, -1)
        u, v = uv_pack[:, :, 0], uv_pack[:, :, 1]  # [3, b, A]: x_i - x_j, x_k - x_j
        uv = _dot(u, v)
        c = _cross(u, v)
        cn = torch.sqrt(_dot(c, c))
        theta = torch.atan2(cn, uv)
        dtheta = theta - self._angle_theta0
        kd = self._angle_k * dtheta
        energy = 0.5 * (kd * dtheta).sum(dim=1)
        if not forces:
            return energy, None
        coef = kd / cn.clamp_min(torch.finfo(cn.dtype).tiny)
        # dθ/du = (u (u·v)/|u|² - v) / |u×v|, dθ/dv likewise
        g = torch.stack(
            [coef * (u * (uv / _dot(u, u)) - v), coef * (v * (uv / _dot(v, v)) - u)], dim=2
        )
        return energy, self._angles_map.scatter(g.reshape(3 * b, -1), mm)

    def _torsions(
        self, xt: torch.Tensor, b: int, forces: bool, mm: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Periodic torsion energy [b] and dU/dx [3b, N]; φ with the IUPAC sign (as OpenMM)."""
        bonds = self._torsions_map.gather(xt, mm).reshape(3, b, 3, -1)
        b1, b2, b3 = bonds[:, :, 0], bonds[:, :, 1], bonds[:, :, 2]  # [3, b, Q]
        m = _cross(b1, b2)
        nv = _cross(b2, b3)
        b2sq = _dot(b2, b2)
        b2n = torch.sqrt(b2sq)
        phi = torch.atan2(b2n * _dot(b1, nv), _dot(m, nv))  # [b, Q]
        arg = self._torsion_n * self._terms_map.gather(phi, mm) - self._torsion_phase
        energy = (self._torsion_k * (1.0 + torch.cos(arg))).sum(dim=1)
        if not forces:
            return energy, None
        de = -self._torsion_k * self._torsion_n * torch.sin(arg)  # dE/dφ per term
        dphi = self._terms_map.scatter(de, mm)  # per dihedral
        # dφ/dx_i, dφ/dx_j, dφ/dx_l (Blondel & Karplus 1996, J. Comput. Chem. 17, 1132)
        gi = -(dphi * b2n / _dot(m, m)) * m
        gl = (dphi * b2n / _dot(nv, nv)) * nv
        p1 = _dot(b1, b2) / b2sq
        p3 = _dot(b3, b2) / b2sq
        gj = p3 * gl - (1.0 + p1) * gi
        # chain rule onto b1 = x_j - x_i, b2 = x_k - x_j, b3 = x_l - x_k
        g = torch.stack([-gi, -(gi + gj), gl], dim=2)
        return energy, self._torsions_map.scatter(g.reshape(3 * b, -1), mm)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product over the leading Cartesian axis of ``[3, ...]`` tensors."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product over the leading Cartesian axis of ``[3, ...]`` tensors."""
    return torch.stack(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    )
