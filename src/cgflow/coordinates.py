"""Differentiable Z-matrix (internal-coordinate) transform for molecules, batched in torch.

A :class:`ZMatrix` maps Cartesian coordinates ``x [..., N, 3]`` (nm) to ``3N - 6`` internal
coordinates ``z`` (bond lengths in nm, bond angles and dihedrals in radians) and back. The inverse
places the three anchor atoms in a canonical frame (``a0`` at the origin, ``a1`` on ``+x``, ``a2``
in the ``xy`` plane with ``y > 0``) and every other atom by the natural-extension reference frame
(NeRF) construction from its bond, angle and dihedral partners, one vectorised step per
"generation" of atoms whose partners are already placed.

The inverse also returns ``log|det dx/dz|``. By default this is the *full* volume element with the
six rigid-body degrees of freedom integrated out (the constant ``log(8 pi^2 V)`` is dropped), so
that a density over ``z`` is the exact marginal of a Boltzmann density over ``x``:
``p(z) = p(x) |det dx/dz|``. Both pieces are available separately: ``rigid=False`` gives the
log-det of the square Jacobian to the free canonical-frame coordinates, and
:meth:`ZMatrix.rigid_log_det` the analytic rigid-body factor.

Why it is written here: the transform is small, exact, batched and carries the full rigid-body
measure; the maintained flow libraries (e.g. zuko) provide no molecular Z-matrix.

Conventions (shared with the rest of cgflow):

* ``z[0] = |x[a1] - x[a0]|``, ``z[1] = |x[a2] - x[a0]|``, ``z[2] =`` angle ``a1-a0-a2``;
* for the ``k``-th row ``(atom, bond, angle, dihedral)`` *in the order given*:
  ``z[3+3k]`` bond ``|x_atom - x_bond|``, ``z[3+3k+1]`` angle ``atom-bond-angle``,
  ``z[3+3k+2]`` dihedral ``atom-bond-angle-dihedral`` (IUPAC/mdtraj sign, wrapped to
  ``[-pi, pi)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = [
    "ALDP_CG_INDICES",
    "ALDP_CHIRAL_ATOMS",
    "ALDP_CIRCULAR",
    "ALDP_PHI_ATOMS",
    "ALDP_PSI_ATOMS",
    "ALDP_ZMATRIX",
    "ZMatrix",
    "angle",
    "canonical_frame",
    "circular_mask",
    "dihedral",
    "is_l_chiral",
    "kabsch_align",
    "kabsch_rmsd",
    "wrap_angle",
]


# --------------------------------------------------------------------------------------------
# geometry primitives
# --------------------------------------------------------------------------------------------


def _eps(dtype: torch.dtype) -> float:
    """Smallest norm we divide by: sqrt(tiny), so its square does not underflow."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / _norm(v).clamp_min(_eps(v.dtype)).unsqueeze(-1)


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Wrap angles (radians) into ``[-pi, pi)``."""
    w = torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi
    # remainder can round up to exactly 2*pi for inputs just below a multiple of 2*pi
    return torch.where(w >= math.pi, w - 2.0 * math.pi, w)


def angle(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Angle ``p0-p1-p2`` at ``p1`` in ``[0, pi]`` (atan2 form, accurate near 0 and pi)."""
    u = p0 - p1
    v = p2 - p1
    return torch.atan2(_norm(torch.linalg.cross(u, v)), (u * v).sum(-1))


def dihedral(
    p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor
) -> torch.Tensor:
    """Dihedral ``p0-p1-p2-p3`` (IUPAC/mdtraj sign) in ``[-pi, pi)``; inputs ``[..., 3]``."""
    b0 = p1 - p0
    b1 = p2 - p1
    b2 = p3 - p2
    c12 = torch.linalg.cross(b1, b2)
    y = _norm(b1) * (b0 * c12).sum(-1)
    xx = (torch.linalg.cross(b0, b1) * c12).sum(-1)
    return wrap_angle(torch.atan2(y, xx))


def _place(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    theta: torch.Tensor,
    phi: torch.Tensor,
) -> torch.Tensor:
    """NeRF: place ``d`` with ``|d-c| = r``, angle ``b-c-d = theta``, dihedral ``a-b-c-d = phi``."""
    bc = _unit(c - b)
    n = _unit(torch.linalg.cross(b - a, bc))
    m = torch.linalg.cross(n, bc)  # in the a-b-c plane, pointing to the side of a
    st = torch.sin(theta)
    local = (
        -torch.cos(theta).unsqueeze(-1) * bc
        + (st * torch.cos(phi)).unsqueeze(-1) * m
        + (st * torch.sin(phi)).unsqueeze(-1) * n
    )
    return c + r.unsqueeze(-1) * local


def canonical_frame(x: torch.Tensor, anchors: Sequence[int]) -> torch.Tensor:
    """Rotate/translate ``x [..., N, 3]`` so that ``a0`` is at the origin, ``a1`` on ``+x`` and
    ``a2`` in the ``xy`` plane with ``y > 0`` (a proper rotation; no reflection)."""
    i0, i1, i2 = (int(i) for i in anchors)
    origin = x[..., i0, :]
    e1 = _unit(x[..., i1, :] - origin)
    e3 = _unit(torch.linalg.cross(e1, x[..., i2, :] - origin))
    e2 = torch.linalg.cross(e3, e1)
    rot = torch.stack([e1, e2, e3], dim=-1)  # columns = new axes
    return (x - origin.unsqueeze(-2)) @ rot


def kabsch_align(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [..., N, 3]`` optimally superposed (rotation + translation, no reflection) onto ``b``."""
    ma = a.mean(-2, keepdim=True)
    mb = b.mean(-2, keepdim=True)
    ca = a - ma
    cb = b - mb
    h = ca.transpose(-1, -2) @ cb
    u, _, vh = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(u @ vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    ones = torch.ones_like(d)
    rot = u @ torch.diag_embed(torch.stack([ones, ones, d], -1)) @ vh
    return ca @ rot + mb


def kabsch_rmsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-configuration RMSD (nm) between ``a`` and ``b`` ``[..., N, 3]`` after superposition."""
    diff = kabsch_align(a, b) - b
    return (diff.square().sum(-1).mean(-1)).sqrt()


def is_l_chiral(x: torch.Tensor, n: int, ca: int, c: int, cb: int, ha: int) -> torch.Tensor:
    """Boolean ``[...]``: is the alpha carbon L-configured?

    Uses the signed volume of the tetrahedron of the four CA substituents,
    ``V = ((x_C - x_N) x (x_CB - x_N)) . (x_HA - x_N)``, which is negative for the L form (checked
    on the openmmtools alanine dipeptide structure, consistent with the CORN rule) and flips sign
    under mirroring. ``ca`` is part of the signature for clarity and is only range-checked.
    """
    n_atoms = x.shape[-2]
    for name, idx in (("n", n), ("ca", ca), ("c", c), ("cb", cb), ("ha", ha)):
        if not -n_atoms <= idx < n_atoms:
            raise ValueError(f"is_l_chiral: index {name}={idx} out of range for {n_atoms} atoms")
    xn = x[..., n, :]
    vol = (torch.linalg.cross(x[..., c, :] - xn, x[..., cb, :] - xn) * (x[..., ha, :] - xn)).sum(-1)
    return vol < 0


# --------------------------------------------------------------------------------------------
# Z-matrix
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Generation:
    rows: tuple[int, ...]  # row positions (order given)
    atoms: tuple[int, ...]
    bond: tuple[int, ...]
    angle: tuple[int, ...]
    dihedral: tuple[int, ...]


_Index5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _DeviceIndices:
    anchors: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # atom, bond, angle, dih
    gens: tuple[_Index5, ...]  # per generation: rows, atoms, bond, angle, dihedral


@dataclass(frozen=True)
class ZMatrix:
    """Three anchor atoms plus rows ``(atom, bond_partner, angle_partner, dihedral_partner)``.

    Rows may be listed in any order; placement follows dependency order. Construction validates
    the Z-matrix (:meth:`validate`). Atom count ``N = 3 + len(rows)``; internal vector length
    ``3N - 6`` (layout in the module docstring).
    """

    anchors: tuple[int, int, int]
    rows: tuple[tuple[int, int, int, int], ...]

    def __post_init__(self) -> None:
        anchors = tuple(int(i) for i in self.anchors)
        rows = tuple(tuple(int(i) for i in row) for row in self.rows)
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "rows", rows)
        self.validate()

    # ---------------------------------------------------------------- sizes and index maps
    @property
    def n_atoms(self) -> int:
        """Number of atoms ``N``."""
        return 3 + len(self.rows)

    @property
    def n_internal(self) -> int:
        """Length ``3N - 6`` of the internal vector."""
        return 3 * self.n_atoms - 6

    @property
    def bond_indices(self) -> tuple[int, ...]:
        """Positions of the bond lengths in ``z`` (incl. the two anchor distances 0 and 1)."""
        return (0, 1, *(3 + 3 * k for k in range(len(self.rows))))

    @property
    def angle_indices(self) -> tuple[int, ...]:
        """Positions of the bond angles in ``z`` (incl. the anchor angle at 2)."""
        return (2, *(4 + 3 * k for k in range(len(self.rows))))

    @property
    def dihedral_indices(self) -> tuple[int, ...]:
        """Positions of the dihedrals in ``z``."""
        return tuple(5 + 3 * k for k in range(len(self.rows)))

    def index_of_dihedral(self, atom: int) -> int:
        """Position in ``z`` of the dihedral of the row that places ``atom``."""
        for k, row in enumerate(self.rows):
            if row[0] == atom:
                return 5 + 3 * k
        if atom in self.anchors:
            raise ValueError(f"atom {atom} is an anchor and has no dihedral")
        raise ValueError(f"atom {atom} has no row in this Z-matrix")

    def dihedral_atoms(self, index: int) -> tuple[int, int, int, int]:
        """The four atoms ``(atom, bond, angle, dihedral partner)`` of the dihedral at position
        ``index`` of ``z`` (e.g. a CG coordinate, for an OpenMM ``CustomTorsionForce``)."""
        k, r = divmod(int(index) - 5, 3)
        if r or not 0 <= k < len(self.rows):
            raise ValueError(f"position {index} of z is not a dihedral")
        return self.rows[k]

    # ---------------------------------------------------------------- validation / plan
    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem if the Z-matrix is not usable."""
        n = self.n_atoms
        if len(self.anchors) != 3:
            raise ValueError(f"expected 3 anchors, got {self.anchors}")
        a0, a1, a2 = self.anchors
        if len({a0, a1, a2}) != 3:
            raise ValueError(f"anchors {self.anchors} are not distinct")
        for k, row in enumerate(self.rows):
            if len(row) != 4:
                raise ValueError(f"row {k} {row}: expected (atom, bond, angle, dihedral)")
        defined = list(self.anchors) + [row[0] for row in self.rows]
        seen: set[int] = set()
        for atom in defined:
            if atom in seen:
                where = "an anchor and a row" if atom in self.anchors else "more than one row"
                raise ValueError(f"duplicate atom {atom}: defined by {where}")
            seen.add(atom)
        missing = sorted(set(range(n)) - seen)
        if missing:
            extra = sorted(seen - set(range(n)))
            raise ValueError(
                f"atom(s) {missing} missing (no anchor or row places them; N = {n}); "
                f"out-of-range atom index(es) defined instead: {extra}"
            )
        for k, row in enumerate(self.rows):
            for idx in row[1:]:
                if not 0 <= idx < n:
                    raise ValueError(
                        f"row {k} {row} for atom {row[0]}: partner index {idx} out of range "
                        f"[0, {n})"
                    )
            if len(set(row)) != 4:
                raise ValueError(f"row {k} {row} for atom {row[0]}: partners not distinct")
        # dependency order (raises on cycles / unplaceable partners)
        self._plan()

    def _plan(self) -> tuple[_Generation, ...]:
        placed = set(self.anchors)
        pending = list(range(len(self.rows)))
        gens: list[_Generation] = []
        while pending:
            ready = [k for k in pending if all(p in placed for p in self.rows[k][1:])]
            if not ready:
                details = "; ".join(
                    f"atom {self.rows[k][0]} waits for "
                    f"{[p for p in self.rows[k][1:] if p not in placed]}"
                    for k in pending
                )
                raise ValueError(
                    f"partner not placeable (cycle or dependency on an unplaced atom): {details}"
                )
            rows = [self.rows[k] for k in ready]
            gens.append(
                _Generation(
                    rows=tuple(ready),
                    atoms=tuple(r[0] for r in rows),
                    bond=tuple(r[1] for r in rows),
                    angle=tuple(r[2] for r in rows),
                    dihedral=tuple(r[3] for r in rows),
                )
            )
            placed.update(r[0] for r in rows)
            ready_set = set(ready)
            pending = [k for k in pending if k not in ready_set]
        return tuple(gens)

    @cached_property
    def generations(self) -> tuple[_Generation, ...]:
        """Placement plan: groups of rows whose partners are placed by earlier groups."""
        return self._plan()

    @cached_property
    def _index_cache(self) -> dict[torch.device, _DeviceIndices]:
        return {}

    def _indices(self, device: torch.device) -> _DeviceIndices:
        """Index tensors of the plan on ``device`` (built once per device)."""
        cache = self._index_cache
        if device not in cache:

            def t(v: Iterable[int]) -> torch.Tensor:
                return torch.tensor(list(v), dtype=torch.long, device=device)

            cols = list(zip(*self.rows, strict=True)) if self.rows else [(), (), (), ()]
            atom, bond, ang, dih = (t(c) for c in cols)
            cache[device] = _DeviceIndices(
                anchors=t(self.anchors),
                rows=(atom, bond, ang, dih),
                gens=tuple(
                    (t(g.rows), t(g.atoms), t(g.bond), t(g.angle), t(g.dihedral))
                    for g in self.generations
                ),
            )
        return cache[device]

    # ---------------------------------------------------------------- transforms
    def _check_x(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"expected x of shape [..., {self.n_atoms}, 3], got {tuple(x.shape)}")

    def _check_z(self, z: torch.Tensor) -> None:
        if z.ndim < 1 or z.shape[-1] != self.n_internal:
            raise ValueError(f"expected z of shape [..., {self.n_internal}], got {tuple(z.shape)}")

    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        """Cartesian ``x [..., N, 3]`` (nm) -> internal ``z [..., 3N-6]``."""
        self._check_x(x)
        batch = x.shape[:-2]
        xf = x.reshape(-1, self.n_atoms, 3)
        idx = self._indices(x.device)
        a0, a1, a2 = self.anchors
        p0, p1, p2 = xf[:, a0], xf[:, a1], xf[:, a2]
        head = torch.stack([_norm(p1 - p0), _norm(p2 - p0), angle(p1, p0, p2)], dim=-1)
        if not self.rows:
            return head.reshape(*batch, 3)
        atom, bond, ang, dih = (xf[:, i] for i in idx.rows)
        rows = torch.stack(
            [_norm(atom - bond), angle(atom, bond, ang), dihedral(atom, bond, ang, dih)], dim=-1
        )
        z = torch.cat([head, rows.reshape(xf.shape[0], -1)], dim=-1)
        return z.reshape(*batch, self.n_internal)

    def to_cartesian(
        self, z: torch.Tensor, rigid: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Internal ``z [..., 3N-6]`` -> canonical-frame ``x [..., N, 3]`` and ``log|det dx/dz|``.

        ``rigid=True`` (default) returns the full log volume element including the rigid-body
        factor; ``rigid=False`` the log-det of the square Jacobian to the free canonical
        coordinates (``a1.x, a2.x, a2.y`` and all coordinates of the other atoms).
        """
        self._check_z(z)
        batch = z.shape[:-1]
        zf = z.reshape(-1, self.n_internal)
        nb = zf.shape[0]
        idx = self._indices(z.device)
        b1, b2, alpha = zf[:, 0], zf[:, 1], zf[:, 2]
        zero = torch.zeros_like(b1)
        anchor_pos = torch.stack(
            [
                torch.stack([zero, zero, zero], -1),
                torch.stack([b1, zero, zero], -1),
                torch.stack([b2 * torch.cos(alpha), b2 * torch.sin(alpha), zero], -1),
            ],
            dim=1,
        )
        x = zf.new_zeros(nb, self.n_atoms, 3).index_copy(1, idx.anchors, anchor_pos)
        zrows = zf[:, 3:].reshape(nb, len(self.rows), 3)
        for rows, atoms, bond, ang, dih in idx.gens:
            zr = zrows[:, rows]
            pos = _place(x[:, dih], x[:, ang], x[:, bond], zr[..., 0], zr[..., 1], zr[..., 2])
            x = x.index_copy(1, atoms, pos)
        logdet = self.log_det_jacobian(zf, rigid=rigid)
        return x.reshape(*batch, self.n_atoms, 3), logdet.reshape(batch)

    def log_det_jacobian(self, z: torch.Tensor, rigid: bool = True) -> torch.Tensor:
        """``log|det dx/dz|`` of :meth:`to_cartesian` at ``z [..., 3N-6]`` (no placement needed).

        Square part ``sum_rows (2 log r + log sin theta) + log b2``; ``rigid=True`` adds
        :meth:`rigid_log_det`.
        """
        self._check_z(z)
        r = z[..., 3::3]
        theta = z[..., 4::3]
        ld = (2.0 * torch.log(r.abs()) + torch.log(torch.sin(theta).abs())).sum(-1)
        ld = ld + torch.log(z[..., 1].abs())
        if rigid:
            ld = ld + self.rigid_log_det(z)
        return ld

    def rigid_log_det(self, z: torch.Tensor) -> torch.Tensor:
        """Rigid-body factor ``2 log b1 + log b2 + log sin(alpha)`` of the full volume element.

        From ``d3a0 d3a1 d3a2 = d3t . b1^2 db1 dOmega1 . b2^2 sin(alpha) db2 dalpha dchi``; the
        ``b2`` of the square part completes ``b2^2``. Translations and rotations (``d3t dOmega1
        dchi``, total ``8 pi^2 V``) are integrated out and their constant is dropped.
        """
        b1, b2, alpha = z[..., 0], z[..., 1], z[..., 2]
        return 2.0 * torch.log(b1.abs()) + torch.log(b2.abs()) + torch.log(torch.sin(alpha).abs())

    def to_internal_with_logdet(
        self, x: torch.Tensor, rigid: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and ``log|det dz/dx|`` = minus the inverse's log-det evaluated at ``z``."""
        z = self.to_internal(x)
        return z, -self.log_det_jacobian(z, rigid=rigid)


def circular_mask(zmatrix: ZMatrix, circular: Iterable[int]) -> torch.Tensor:
    """Boolean ``[3N-6]`` mask, True at the positions in ``circular`` (which must be dihedrals)."""
    dihedrals = set(zmatrix.dihedral_indices)
    mask = torch.zeros(zmatrix.n_internal, dtype=torch.bool)
    for i in circular:
        i = int(i)
        if i not in dihedrals:
            raise ValueError(
                f"circular index {i} is not a dihedral position of this Z-matrix "
                f"(dihedrals sit at 5, 8, ..., {zmatrix.n_internal - 1})"
            )
        mask[i] = True
    return mask


# --------------------------------------------------------------------------------------------
# alanine dipeptide (ACE-ALA-NME, atom order of openmmtools AlanineDipeptideImplicit)
# --------------------------------------------------------------------------------------------
# 0 HH31, 1 CH3(ACE), 2 HH32, 3 HH33, 4 C(ACE), 5 O, 6 N, 7 H, 8 CA, 9 HA, 10 CB, 11-13 HB,
# 14 C, 15 O, 16 N(NME), 17 H, 18 CH3, 19-21 H

ALDP_ZMATRIX = ZMatrix(
    anchors=(8, 6, 14),
    rows=(
        (0, 1, 4, 6),
        (1, 4, 6, 8),
        (2, 1, 4, 0),
        (3, 1, 4, 0),
        (4, 6, 8, 14),
        (5, 4, 6, 8),
        (7, 6, 8, 4),
        (9, 8, 6, 4),
        (10, 8, 6, 4),
        (11, 10, 8, 6),
        (12, 10, 8, 11),
        (13, 10, 8, 11),
        (15, 14, 8, 16),
        (16, 14, 8, 6),
        (17, 16, 14, 15),
        (18, 16, 14, 8),
        (19, 18, 16, 14),
        (20, 18, 16, 19),
        (21, 18, 16, 19),
    ),
)
ALDP_PHI_ATOMS = (4, 6, 8, 14)
ALDP_PSI_ATOMS = (6, 8, 14, 16)
#: dihedral of row (4, 6, 8, 14) is phi; of row (16, 14, 8, 6) is psi (= 6-8-14-16)
ALDP_CG_INDICES = (17, 44)
#: free torsions; the other dihedrals (11, 14, 35, 38, 41, 56, 59) are narrow improper-like
#: siblings and are treated as ordinary real coordinates
ALDP_CIRCULAR = frozenset({5, 8, 17, 20, 23, 26, 29, 32, 44, 47, 50, 53})
ALDP_CHIRAL_ATOMS: dict[str, int] = {"n": 6, "ca": 8, "c": 14, "cb": 10, "ha": 9}
