"""Procedural head meshes driven by an identity code and an expression code.

World frame: metres, y up, the face looks along +z, the head centred at the origin.
The mesh is a latitude/longitude sphere deformed into a head, so topology is fixed
and per-vertex canonical coordinates are simply the neutral-expression positions.

Expression dimensions (the first `N_NAMED_EXPRESSIONS` have names; the rest drive
small smooth random displacement modes, standing in for the long tail of a real
200-d NPHM code):

==== ============== =======================================================
dim  name           effect
==== ============== =======================================================
0    jaw_open       lower face rotates down, mouth band opens and sinks in
1    brow_raise     forehead above the eyes moves up
2    cheek_puff     cheeks bulge outwards
3    smile          mouth corners move up and back
4    tongue_colour  appearance only: colour of the mouth interior
5    gaze_x         appearance only: iris moves left/right
6    gaze_y         appearance only: iris moves up/down
7    blink          appearance only: eyelid covers the eye
==== ============== =======================================================

Dimensions 4-6 change the image without moving the mesh: only expression
conditioning can explain them. Ambient (hyper) dims: 0 = jaw opening near the
mouth, 1 = blink near the eyes; both are zero away from those regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_NAMED_EXPRESSIONS = 8
JAW, BROW, CHEEK, SMILE, TONGUE, GAZE_X, GAZE_Y, BLINK = range(N_NAMED_EXPRESSIONS)
#: Canonical coordinates are neutral positions divided by this, so they lie in about [-1, 1].
CANONICAL_SCALE = 0.13


#: Skin tones and hair colours a person's are drawn from (plus a little jitter): persons must
#: differ at a glance, so that a render that looks like "a head" but not like its person shows.
SKIN_TONES = np.array([[0.95, 0.8, 0.7], [0.87, 0.64, 0.52], [0.66, 0.45, 0.32], [0.45, 0.3, 0.22],
                       [0.93, 0.6, 0.68], [0.72, 0.6, 0.88]])
HAIR_COLOURS = np.array([[0.07, 0.06, 0.05], [0.38, 0.22, 0.1], [0.88, 0.74, 0.38], [0.62, 0.2, 0.07],
                         [0.15, 0.52, 0.22], [0.2, 0.3, 0.75]])



def palette_pair(look: int) -> tuple[int, int]:
    """(skin tone, hair colour) indices of look ``look``: a distinct pair for each of looks 0..29
    (persons 000-007: light/brown, medium/blonde, tan/red, dark/green, pink/blue, purple/black,
    light/blonde, medium/red)."""
    n = len(SKIN_TONES)
    skin = look % n
    return skin, (skin + 1 + (look // n) % (n - 1)) % n


@dataclass(frozen=True)
class Identity:
    """Per-person shape and appearance parameters, drawn from a seed."""

    radii: np.ndarray  # (3,) ellipsoid radii in metres (x, y, z)
    nose: float  # nose bump amplitude (m)
    chin: float  # chin protrusion (m)
    ears: float  # ear bump amplitude (m)
    skin: np.ndarray  # (3,) base skin colour in [0, 1]
    hair: np.ndarray  # (3,) hair colour
    iris: np.ndarray  # (3,) iris colour
    hairline: float  # canonical y above which hair starts (front)
    detail_freq: np.ndarray  # (3,) spatial frequencies of the fine skin pattern
    detail_phase: np.ndarray  # (3,)
    modes: np.ndarray  # (K, 4) random low-frequency displacement modes for the tail dims
    ear_fold: float = 0.0  # radians the ears are swung forward over the cheeks (0: no fold, the default)

    @staticmethod
    def sample(rng: np.random.Generator, expression_dim: int, look: int | None = None) -> "Identity":
        """``look`` picks the (skin tone, hair colour) pair, so that persons 0..29 all differ (see
        :func:`palette_pair`); None draws it."""
        n_modes = max(0, expression_dim - N_NAMED_EXPRESSIONS)
        skin_index, hair_index = palette_pair(int(rng.integers(30)) if look is None else look)
        return Identity(
            radii=np.array([rng.uniform(0.072, 0.084), rng.uniform(0.098, 0.11), rng.uniform(0.088, 0.1)]),
            nose=rng.uniform(0.012, 0.02),
            chin=rng.uniform(0.004, 0.01),
            ears=rng.uniform(0.006, 0.012),
            skin=np.clip(SKIN_TONES[skin_index] + rng.normal(0, 0.03, 3), 0.05, 0.97),
            hair=np.clip(HAIR_COLOURS[hair_index] + rng.normal(0, 0.03, 3), 0.02, 0.95),
            iris=rng.uniform(0.1, 0.7, size=3),
            hairline=rng.uniform(0.35, 0.55),
            detail_freq=rng.uniform(55.0, 80.0, size=3),
            detail_phase=rng.uniform(0, 2 * np.pi, size=3),
            modes=np.concatenate([rng.normal(size=(n_modes, 3)), rng.uniform(0, 2 * np.pi, (n_modes, 1))], axis=1),
        )


def sphere_mesh(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (V, 3) and faces (F, 3) of a lat/long sphere with two poles.

    Faces: 2 * n_lon * (n_lat - 1), wound counter-clockwise seen from outside.
    """
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]  # polar angle from +y, poles excluded
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)], axis=-1).reshape(-1, 3)
    dirs = np.concatenate([[[0.0, 1.0, 0.0]], ring, [[0.0, -1.0, 0.0]]])
    top, bottom = 0, len(dirs) - 1

    def vid(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return 1 + i * n_lon + (j % n_lon)

    j = np.arange(n_lon)
    faces = [np.stack([np.full(n_lon, top), vid(0, j), vid(0, j + 1)], 1)]
    i, j = np.meshgrid(np.arange(n_lat - 2), np.arange(n_lon), indexing="ij")
    i, j = i.ravel(), j.ravel()
    a, b, c, d = vid(i, j), vid(i + 1, j), vid(i + 1, j + 1), vid(i, j + 1)
    faces += [np.stack([a, b, c], 1), np.stack([a, c, d], 1)]
    j = np.arange(n_lon)
    faces.append(np.stack([np.full(n_lon, bottom), vid(n_lat - 2, j + 1), vid(n_lat - 2, j)], 1))
    faces = np.concatenate(faces).astype(np.int32)
    # Make winding outward-facing (CCW from outside): flip where the normal points inward.
    tri = dirs[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = (n * tri.mean(1)).sum(1) < 0
    faces[inward] = faces[inward][:, [0, 2, 1]]
    return dirs, faces


def _bump(dirs: np.ndarray, centre, width: float) -> np.ndarray:
    """Smooth bump in [0, 1] on the unit sphere around direction `centre`."""
    c = np.asarray(centre, dtype=np.float64)
    c = c / np.linalg.norm(c)
    return np.exp(-(1.0 - dirs @ c) / (width**2))


# Feature locations as directions on the unit sphere (face looks along +z).
MOUTH = (0.0, -0.42, 0.9)
NOSE = (0.0, -0.08, 1.0)
CHIN = (0.0, -0.75, 0.65)
EYES = ((-0.33, 0.2, 0.92), (0.33, 0.2, 0.92))
CHEEKS = ((-0.6, -0.2, 0.75), (0.6, -0.2, 0.75))
BROWS = (0.0, 0.42, 0.9)


def mouth_band(dirs: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the thin horizontal band that opens into the mouth interior."""
    m = np.asarray(MOUTH) / np.linalg.norm(MOUTH)
    # Elevation offset from the mouth line and angular distance along it.
    dy = dirs[:, 1] - m[1]
    lateral = np.abs(dirs[:, 0])
    front = dirs[:, 2] > 0.5
    return np.exp(-(dy / 0.035) ** 2) * np.exp(-(lateral / 0.28) ** 4) * front


def neutral_head(dirs: np.ndarray, ident: Identity) -> np.ndarray:
    """Neutral-expression vertex positions (V, 3) for an identity."""
    pos = dirs * ident.radii
    normal = dirs  # a close enough displacement direction for small bumps
    disp = ident.nose * _bump(dirs, NOSE, 0.13)
    disp += ident.chin * _bump(dirs, CHIN, 0.25)
    disp += ident.ears * (_bump(dirs, (1, 0, -0.05), 0.18) + _bump(dirs, (-1, 0, -0.05), 0.18))
    disp -= 0.006 * sum(_bump(dirs, e, 0.12) for e in EYES)  # eye sockets
    disp += 0.004 * _bump(dirs, BROWS, 0.2)  # brow ridge
    disp -= 0.004 * mouth_band(dirs)  # lips line
    pos = pos + normal * disp[:, None]
    return fold_ears(pos, dirs, ident.ear_fold) if ident.ear_fold else pos


#: Ear centres as directions; EAR_WIDTH the angular width of the (folded) ear flap.
EARS = ((1.0, 0.0, -0.05), (-1.0, 0.0, -0.05))
EAR_WIDTH = 0.22


def ear_weight(dirs: np.ndarray) -> np.ndarray:
    """(V,) weight in [0, 1] of the ear flaps on the material sphere."""
    return sum(_bump(dirs, e, EAR_WIDTH) for e in EARS)


def fold_ears(pos: np.ndarray, dirs: np.ndarray, angle: float) -> np.ndarray:
    """Swing each ear forward about the vertical axis by up to ``angle`` radians and lift it 30%
    off the head: with ``angle`` above ~0.4 the flap's front overhangs the cheek, so the surface is
    no longer star-shaped around the centre. Two surface points (the flap and the cheek under it)
    then lie on one ray from the centre with different appearance: a spherical (azimuth,
    elevation) parametrisation folds them onto one texel, 3-D canonical positions keep them
    apart."""
    out = pos.copy()
    for side, centre in zip((1.0, -1.0), EARS):
        w = _bump(dirs, centre, EAR_WIDTH)
        a = -side * angle * w  # the right ear (+x) turns towards +z by lowering its azimuth
        c, s = np.cos(a), np.sin(a)
        x, z = out[:, 0].copy(), out[:, 2].copy()
        out[:, 0], out[:, 2] = x * c + z * s, -x * s + z * c
        out *= (1.0 + 0.3 * w)[:, None]
    return out


def expression_offsets(dirs: np.ndarray, neutral: np.ndarray, ident: Identity, expr: np.ndarray) -> np.ndarray:
    """Vertex displacements (V, 3) caused by the geometric expression dims."""
    off = np.zeros_like(neutral)
    jaw = max(float(expr[JAW]), 0.0)
    m = np.asarray(MOUTH) / np.linalg.norm(MOUTH)
    below = 1.0 / (1.0 + np.exp(-(m[1] - dirs[:, 1]) / 0.03))  # smooth step below the mouth line
    front = np.clip(dirs[:, 2] + 0.2, 0.0, 1.0)
    jaw_w = below * front
    # Jaw: rotate the lower face down about a hinge behind the mouth.
    angle = 0.35 * jaw
    hinge = np.array([0.0, -0.01, -0.02])
    rel = neutral - hinge
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([rel[:, 0], c * rel[:, 1] - s * rel[:, 2], s * rel[:, 1] + c * rel[:, 2]], 1)
    off += (rot - rel) * jaw_w[:, None]
    off -= dirs * (0.012 * jaw * mouth_band(dirs))[:, None]  # the mouth band sinks into the cavity
    off[:, 1] += 0.01 * float(expr[BROW]) * _bump(dirs, BROWS, 0.3)
    off += dirs * (0.008 * float(expr[CHEEK]) * sum(_bump(dirs, ch, 0.22) for ch in CHEEKS))[:, None]
    corners = _bump(dirs, (-0.3, -0.42, 0.85), 0.12) + _bump(dirs, (0.3, -0.42, 0.85), 0.12)
    smile = float(expr[SMILE])
    off[:, 1] += 0.008 * smile * corners
    off[:, 2] -= 0.004 * smile * corners
    for k, (ax, ay, az, phase) in enumerate(ident.modes):
        field = np.sin(2.0 * (dirs @ np.array([ax, ay, az])) + phase)
        off += dirs * (0.0015 * float(expr[N_NAMED_EXPRESSIONS + k]) * field)[:, None]
    return off


def ambient_coords(dirs: np.ndarray, expr: np.ndarray) -> np.ndarray:
    """The 2 ambient canonical dims (V, 2): non-zero only around the mouth and the eyes."""
    jaw = max(float(expr[JAW]), 0.0)
    mouth_w = _bump(dirs, MOUTH, 0.2)
    eye_w = sum(_bump(dirs, e, 0.1) for e in EYES)
    blink = float(np.clip(expr[BLINK], 0.0, 1.0))
    return np.stack([jaw * mouth_w, blink * eye_w], 1)


def smooth_and_perturb(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator,
                       iterations: int, noise: float) -> np.ndarray:
    """A 'fitted' mesh: Laplacian-smoothed (loses fine geometry) plus vertex noise (tracking error)."""
    n = len(vertices)
    src = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    dst = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    deg = np.bincount(src, minlength=n).astype(np.float64)
    v = vertices.astype(np.float64)
    for _ in range(iterations):
        acc = np.stack([np.bincount(src, weights=v[dst, k], minlength=n) for k in range(3)], 1)
        v = 0.5 * v + 0.5 * acc / deg[:, None]
    return v + rng.normal(scale=noise, size=v.shape)
