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
