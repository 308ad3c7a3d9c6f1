"""Vectorised jet kinematics on (E, px, py, pz) arrays.

All functions take arrays whose last axis is the four-vector (E, px, py, pz), the layout of the
Top Quark Tagging Reference Dataset, and work on any leading shape ([N, 200, 4] constituents,
[N, 4] jets, ...). Zero rows (padding) give pT = 0, eta = 0, phi = 0 rather than NaN.
"""

from __future__ import annotations

import numpy as np

E, PX, PY, PZ = range(4)


def pt(p4: np.ndarray) -> np.ndarray:
    """Transverse momentum."""
    return np.hypot(p4[..., PX], p4[..., PY])


def eta(p4: np.ndarray) -> np.ndarray:
    """Pseudorapidity; 0 where pT = 0 (padding) instead of +-inf."""
    transverse = pt(p4)
    safe = np.where(transverse > 0, transverse, 1.0)
    return np.where(transverse > 0, np.arcsinh(p4[..., PZ] / safe), 0.0).astype(p4.dtype, copy=False)


def phi(p4: np.ndarray) -> np.ndarray:
    """Azimuth in [-pi, pi]; 0 for padding (arctan2(0, 0) is 0)."""
    return np.arctan2(p4[..., PY], p4[..., PX])


def mass(p4: np.ndarray) -> np.ndarray:
    """Invariant mass; tiny negative m^2 from rounding is clipped to 0."""
    m2 = p4[..., E] ** 2 - p4[..., PX] ** 2 - p4[..., PY] ** 2 - p4[..., PZ] ** 2
    return np.sqrt(np.clip(m2, 0.0, None))


def jet_four_momentum(constituents: np.ndarray) -> np.ndarray:
    """Sum of the constituents ([N, M, 4] -> [N, 4]), accumulated in float64 for stability."""
    return constituents.sum(axis=-2, dtype=np.float64)


def delta_phi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b wrapped into [-pi, pi)."""
    return (np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi


def delta_r(eta_a: np.ndarray, phi_a: np.ndarray, eta_b: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
    """Distance in the (eta, phi) plane with phi wrapped."""
    return np.hypot(np.asarray(eta_a) - np.asarray(eta_b), delta_phi(phi_a, phi_b))


# E >= |p| for every particle (massless ones have E = |p|), but the four components are stored as
# float32: each is rounded once, by at most u = 2**-24 of itself, so a massless particle's stored
# E / |p| can lie as low as (1 - u) / (1 + u) ~ 1 - 2u (the check itself runs in float64, adding
# nothing that matters; the generator's own jets reach 1 - 1.7u). A client that computes the
# components in float32 from (pT, eta, phi, m), as detector-level producers do (CMSSW's candidates
# hold float four-vectors), adds a few roundings of u each, and more where it goes through
# (pT, eta) at large |eta|, where pz and E are both ~ pT sinh(eta) and cosh(eta) rounded apart.
# 2**-16 ~ 1.5e-5 (128u) leaves that margin many times over, and nothing physical hides in it: it
# is a negative mass^2 of 3e-5 p^2, while what the check is for (columns swapped, momenta in
# other units than energies, garbage) misses by whole factors.
ENERGY_TOLERANCE = 2.0**-16


def first_unphysical(constituents: np.ndarray, tolerance: float = ENERGY_TOLERANCE) -> tuple[int, int, str] | None:
    """The first impossible entry of finite constituents ``[N, M, 4]`` (E, px, py, pz), else None.

    Returns ``(jet, constituent, what)``; ``constituent`` is -1 for a jet with no constituent at all
    (every row zero: not a jet). Zero rows are padding and always fine; any other row needs
    E >= 0 and E >= |p| (1 - ``tolerance``). Vectorised: one pass over the batch when all is well.
    """
    p4 = np.asarray(constituents, dtype=np.float64)  # squares of float32 values neither overflow nor underflow
    energy = p4[..., E]
    p2 = np.einsum("...i,...i->...", p4[..., PX:], p4[..., PX:])
    bad = (energy < 0) | (energy * energy < p2 * (1.0 - tolerance) ** 2)
    # A row with E = 0 and p != 0 is bad already, so a jet with no bad row is empty when no E is set.
    empty = ~energy.any(axis=-1)
    if not (bad.any() or empty.any()):
        return None
    rows = np.flatnonzero(bad.any(axis=-1) | empty)
    jet = int(rows[0])
    if empty[jet]:
        return jet, -1, "has no constituent (every row is zero): not a jet"
    k = int(np.argmax(bad[jet]))
    e, momentum = float(energy[jet, k]), float(np.sqrt(p2[jet, k]))
    if e < 0:
        return jet, k, f"has negative energy E = {e:.7g} GeV"
    return jet, k, f"has E = {e:.7g} GeV below |p| = {momentum:.7g} GeV (E >= |p| for any particle)"
