"""Appearance of the synthetic heads: a texture defined in canonical space plus simple shading.

The texture is evaluated per pixel from two interpolated surface attributes: the
unit-sphere material direction (for region masks: eyes, mouth, hair) and the
canonical position (for the fine skin pattern). The fine pattern has a wavelength
of a few pixels, so only features stored in canonical space (the TriPlanes) can
reproduce it; the iris position and the mouth-interior colour depend on
expression dims that do not move the mesh.
"""

from __future__ import annotations

import numpy as np

from .head import BLINK, CHEEKS, EYES, GAZE_X, GAZE_Y, JAW, MOUTH, TONGUE, Identity, ear_weight

#: World-space direction towards the key light.
LIGHT_DIR = np.array([0.35, 0.55, 0.75]) / np.linalg.norm([0.35, 0.55, 0.75])
AMBIENT_LIGHT = 0.35
#: Eye sizes as angles on the unit material sphere (radians): sclera, iris, pupil, and how far
#: gaze 1.0 moves the iris. At the tiny preset's 64x64 (~23 px per radian) an eye is ~8 px wide,
#: the iris ~5 px and the pupil ~2.3 px: the iris spans at least one 4x4 cell of the tiny VAE's
#: latent, which the earlier 6 / 3 / 1.5 px eyes did not (the base VAE smeared the pupils away).
EYE_RADIUS, IRIS_RADIUS, PUPIL_RADIUS, GAZE_SHIFT = 0.17, 0.105, 0.05, 0.07
#: Stochastic hair (ablation data): strands per turn of azimuth (~7 px apart at 64x64) and contrast.
RANDOM_STRANDS, RANDOM_STRAND_CONTRAST = 20.0, 0.5
#: Half-height of the mouth interior band (radians) when closed, and its growth at jaw 1.0
#: (~1.4 px closed, ~5.5 px open at 64x64).
MOUTH_CLOSED, MOUTH_OPEN = 0.03, 0.09


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a * (1.0 - w[:, None]) + b * w[:, None]


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def albedo(dirs: np.ndarray, canonical: np.ndarray, ident: Identity, expr: np.ndarray,
           hair_phase: float | None = None) -> np.ndarray:
    """Surface colour (N, 3) in [0, 1] at N surface points.

    dirs: (N, 3) unit material directions; canonical: (N, 3) canonical positions; hair_phase: None
    for the default hair, else the phase of coarse strands drawn per frame (`base_colour`).
    """
    dirs = dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-8)
    col = base_colour(dirs, canonical, ident, expr, hair_phase)
    gaze, blink = eye_pose(expr)
    for e in EYES:
        d = dirs - _unit(e)
        r = np.linalg.norm(d, axis=1)
        # Every weight of the eye is exactly 0 from EYE_RADIUS + 0.02 on, where mixing leaves the
        # colour bit for bit unchanged: only the ~2% of pixels nearer are drawn (same values).
        near = np.flatnonzero(~(r >= EYE_RADIUS + 0.02))
        col[near] = draw_eye(col[near], d[near], r[near], gaze, blink, ident)
    return np.clip(col, 0.0, 1.0)


def base_colour(dirs: np.ndarray, canonical: np.ndarray, ident: Identity, expr: np.ndarray,
                hair_phase: float | None = None) -> np.ndarray:
    """`albedo` before the eyes are drawn (not clipped); `dirs` unit rows.

    ``hair_phase`` (ablation data): the hair's strands become coarse (``RANDOM_STRANDS`` per turn,
    visible at 64x64) and shifted by this phase, which the generator draws per frame from a seed no
    input carries: appearance that mesh, camera and expression code do not determine, which a
    regression can only predict as its mean (flat hair) and a diffusion model can sample.
    """
    n = len(dirs)
    col = np.tile(ident.skin, (n, 1))
    # Low-frequency variation and blush.
    col *= (1.0 + 0.08 * np.sin(3.0 * canonical[:, :1] + 1.0) * np.cos(2.5 * canonical[:, 1:2]))
    blush = sum(np.exp(-(1.0 - dirs @ _unit(c)) / 0.02) for c in CHEEKS)
    col = _mix(col, col * np.array([1.08, 0.82, 0.82]), 0.6 * blush)
    # Fine pattern in canonical space: pores/freckles, wavelength ~0.1 canonical units.
    f, p = ident.detail_freq, ident.detail_phase
    pattern = np.sin(f[0] * canonical[:, 0] + p[0]) * np.sin(f[1] * canonical[:, 1] + p[1]) \
        * np.sin(f[2] * canonical[:, 2] + p[2])
    col *= (1.0 + 0.22 * pattern)[:, None]
    if ident.ear_fold:  # folded ears: a flap of its own colour over the cheek (see head.fold_ears)
        col = _mix(col, col * np.array([1.05, 0.62, 0.62]), np.clip(ear_weight(dirs), 0.0, 1.0))
    # Hair: top and back of the head, with strands along the azimuth.
    azimuth = np.arctan2(dirs[:, 0], dirs[:, 2])
    hair_w = np.maximum(_smoothstep(ident.hairline, ident.hairline + 0.08, dirs[:, 1]),
                        _smoothstep(-0.15, -0.35, dirs[:, 2]) * _smoothstep(-0.5, -0.3, dirs[:, 1]))
    if hair_phase is None:
        strands = ident.hair[None] * (1.0 + 0.35 * np.sin(90.0 * azimuth + 7.0 * dirs[:, 1]))[:, None]
    else:
        wave = np.sin(RANDOM_STRANDS * azimuth + 4.0 * dirs[:, 1] + hair_phase)
        strands = ident.hair[None] * (1.0 + RANDOM_STRAND_CONTRAST * wave)[:, None] + 0.12 * wave[:, None]
    col = _mix(col, strands, hair_w)
    # Lips and the mouth interior (the interior colour is an expression dim, not geometry); the
    # interior widens with the jaw opening, a dark line when the mouth is closed.
    m = _unit(MOUTH)
    dy = dirs[:, 1] - m[1]
    lateral = np.abs(dirs[:, 0])
    front = dirs[:, 2] > 0.5
    lips = np.exp(-(dy / 0.075) ** 2) * np.exp(-(lateral / 0.3) ** 4) * front
    col = _mix(col, np.array([0.6, 0.14, 0.2]), 0.85 * lips)
    opening = MOUTH_CLOSED + MOUTH_OPEN * max(float(expr[JAW]), 0.0)
    interior = np.exp(-(dy / opening) ** 2) * np.exp(-(lateral / 0.26) ** 4) * front
    t = 1.0 / (1.0 + np.exp(-2.0 * float(expr[TONGUE])))
    interior_col = _mix(np.array([[0.65, 0.12, 0.18]]), np.array([[0.2, 0.55, 0.35]]), np.array([t]))[0] * 0.8
    col = _mix(col, np.tile(interior_col, (n, 1)), np.clip(1.4 * interior, 0, 1))
    return col


def eye_pose(expr: np.ndarray) -> tuple[np.ndarray, float]:
    """(gaze shift of the iris (2,), blink in [0, 1]) from an expression code."""
    return np.array([float(expr[GAZE_X]), float(expr[GAZE_Y])]) * GAZE_SHIFT, float(np.clip(expr[BLINK], 0.0, 1.0))


def draw_eye(col: np.ndarray, d: np.ndarray, r: np.ndarray, gaze: np.ndarray, blink: float,
             ident: Identity) -> np.ndarray:
    """Colour (N, 3) of N surface points with one eye drawn over `col`: sclera, iris moved by gaze
    (appearance only), pupil, eyelid closed by blink; `d` (N, 3) is the material direction minus
    the eye's centre, `r` its length. Sized so that at the tiny preset's 64x64 an eye is ~8 pixels
    wide and gaze moves the iris ~1.6 pixels."""
    sclera = _smoothstep(EYE_RADIUS, EYE_RADIUS - 0.01, r)
    col = _mix(col, np.array([0.95, 0.94, 0.92]), sclera)
    di = d.copy()
    di[:, 0] -= gaze[0]
    di[:, 1] -= gaze[1]
    ri = np.linalg.norm(di, axis=1)
    iris = _smoothstep(IRIS_RADIUS, IRIS_RADIUS - 0.008, ri) * sclera
    col = _mix(col, ident.iris[None] * (0.8 + 0.2 * np.cos(40 * np.arctan2(di[:, 1], di[:, 0])))[:, None], iris)
    col = _mix(col, np.array([0.03, 0.03, 0.04]), _smoothstep(PUPIL_RADIUS, PUPIL_RADIUS - 0.006, ri) * sclera)
    # the lid comes down from the top of the eye: blink 1 covers it
    edge = EYE_RADIUS * (1.0 - 2.0 * blink)
    lid = _smoothstep(edge - 0.008, edge + 0.008, d[:, 1]) if blink > 0.02 else np.zeros(len(r))
    lid_w = lid * _smoothstep(EYE_RADIUS + 0.02, EYE_RADIUS, r)
    return _mix(col, ident.skin * 0.85, lid_w)


def shade(colour: np.ndarray, world_normals: np.ndarray) -> np.ndarray:
    """Lambertian shading with one key light and ambient light."""
    lam = np.clip(world_normals @ LIGHT_DIR, 0.0, 1.0)
    return np.clip(colour * (AMBIENT_LIGHT + (1.0 - AMBIENT_LIGHT) * lam)[:, None], 0.0, 1.0)


def background(height: int, width: int, camera_index: int) -> np.ndarray:
    """A studio-like backdrop (H, W, 3): a vertical grey gradient that differs per camera."""
    g = np.linspace(0.55, 0.35, height)[:, None, None] + 0.03 * (camera_index % 4)
    return np.broadcast_to(np.clip(g, 0, 1) * np.array([1.0, 0.98, 0.95]), (height, width, 3)).copy()
