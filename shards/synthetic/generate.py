"""Write a synthetic multi-view head capture root that follows the data contract.

Each person gets a random identity, several sequences of smoothly varying
expression codes, 16 cameras on a dome (NeRSemble serials, the frontal one
222200037) and, per frame, a *fitted* mesh (smoothed + noisy, what a tracker would
give) next to ground-truth images rendered from the *true* mesh. Everything is a
pure function of (config, seed): the same config writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.io import atomic_directory, read_marker

from ..contract import (
    Calibration,
    Camera,
    MeshFrame,
    PersonCapture,
    TrackingMeta,
    atomic_write_bytes,
    atomic_write_json,
)
from ..raster import RasterBuffers, rasterize, rasterize_views
from . import head as H
from .texture import albedo, background, shade

#: NeRSemble's 16 camera serials; 222200037 is the frontal camera.
NERSEMBLE_SERIALS = (
    "220700191", "221501007", "222200036", "222200037", "222200038", "222200039", "222200040", "222200041",
    "222200042", "222200043", "222200044", "222200045", "222200046", "222200047", "222200048", "222200049",
)
FRONTAL_SERIAL = "222200037"
#: (azimuth, elevation) in degrees per camera, in serial order; the frontal one looks straight at the face.
_DOME = ((-75, 0), (-50, 0), (-25, 0), (0, 0), (25, 0), (50, 0), (75, 0),
         (-60, 20), (-30, 20), (0, 22), (30, 20), (60, 20),
         (-45, -15), (-15, -15), (15, -15), (45, -15))
SEQUENCE_NAMES = ("EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+nose", "EXP-4-lips", "EMO-1-shout+laugh",
                  "EMO-2-surprise+fear", "EMO-3-angry+sad", "EMO-4-disgust+happy")
#: Expression dims that change the image but not the mesh (only the expression code explains them).
APPEARANCE_ONLY = (H.TONGUE, H.GAZE_X, H.GAZE_Y)
#: Expression dims each sequence emphasises (others still move, at a third of the amplitude).
_EMPHASIS = {
    "EXP-1-head": (H.BROW, H.SMILE), "EXP-2-eyes": (H.GAZE_X, H.GAZE_Y, H.BLINK),
    "EXP-3-cheeks+nose": (H.CHEEK, H.BROW), "EXP-4-lips": (H.JAW, H.SMILE, H.TONGUE),
}


@dataclass
class SyntheticConfig:
    """Size and randomness of a synthetic capture (defaults: the main job's data set)."""

    persons: int = 8
    """Number of persons; ids are zero-padded indices '000', '001', ..."""
    sequences: int = 6
    """Sequences per person (at most 8); the last two are the held-out ones by default."""
    frames: int = 8
    """Timesteps per sequence."""
    cameras: int = 16
    """Cameras per person (at most 16, always including the frontal camera 222200037)."""
    image_size: int = 128
    """Square image side in pixels."""
    n_lat: int = 100
    """Latitude rings of the head mesh; faces = 2 * n_lon * (n_lat - 1)."""
    n_lon: int = 160
    """Longitude segments of the head mesh."""
    expression_dim: int = 16
    """Declared expression code dimension (>= 8; dims past 8 are small geometric modes)."""
    fit_smoothing: int = 3
    """Laplacian smoothing iterations that make the fitted mesh lose fine geometry."""
    fit_noise: float = 0.0004
    """Std of the fitted mesh's per-vertex noise in metres (tracking error)."""
    camera_distance: float = 1.0
    """Distance of every camera from the head centre in metres."""
    seed: int = 0
    """Master seed: the whole data set is a function of the config including this."""
    stochastic_hair: bool = False
    """Ablation data ("w/o diffusion"): coarse hair strands (~7 px apart at 64x64) with a random phase
    per frame that no input carries, so the conditioning leaves that appearance open."""
    detail_wavelength: float = 0.0
    """Ablation data ("spherical features"): the fine skin pattern's mean wavelength in canonical units
    (neutral metres / 0.13; the head's radius is ~0.7 of them); 0 keeps the default (~0.1,
    2-3 px at 64x64, below both feature maps' resolution)."""
    folded_ears: bool = False
    """Ablation data ("spherical features"): ears swung forward over the cheeks with a colour of
    their own, so the surface is not star-shaped (see head.fold_ears)."""
    novel_expressions: int = 0
    """Ablation data ("w/o LDM prior"): > 0 withholds one expression (jaw open for even person
    indices, eyes closed for odd ones) from a person's sequences except the last
    `novel_expressions` in sorted order (the held-out ones when it equals the ingest's
    held_out_sequences), which show it strongly: held out, it was seen only in other persons' data."""

    def __post_init__(self) -> None:
        if not 1 <= self.sequences <= len(SEQUENCE_NAMES):
            raise ValueError(f"sequences must be in [1, {len(SEQUENCE_NAMES)}], got {self.sequences}")
        if not 1 <= self.cameras <= len(NERSEMBLE_SERIALS):
            raise ValueError(f"cameras must be in [1, {len(NERSEMBLE_SERIALS)}], got {self.cameras}")
        if self.expression_dim < H.N_NAMED_EXPRESSIONS:
            raise ValueError(f"expression_dim must be >= {H.N_NAMED_EXPRESSIONS}, got {self.expression_dim}")
        for name, low in (("persons", 1), ("frames", 1), ("image_size", 8), ("fit_smoothing", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.n_lat < 2:
            raise ValueError(f"n_lat must be >= 2 (at least one latitude ring between the poles), got {self.n_lat}")
        if self.n_lon < 3:
            raise ValueError(f"n_lon must be >= 3 (a ring of fewer vertices encloses nothing), got {self.n_lon}")
        if not (math.isfinite(self.fit_noise) and self.fit_noise >= 0):
            raise ValueError(f"fit_noise must be a finite std >= 0 in metres (0: no noise), got {self.fit_noise}")
        if not (math.isfinite(self.camera_distance) and self.camera_distance > 0):
            raise ValueError(f"camera_distance must be a finite distance > 0 in metres, got {self.camera_distance}")
        if not 0 <= self.novel_expressions < self.sequences:
            raise ValueError(f"novel_expressions must be in [0, sequences - 1 = {self.sequences - 1}], "
                             f"got {self.novel_expressions}")
        if not (math.isfinite(self.detail_wavelength) and self.detail_wavelength >= 0):
            raise ValueError(f"detail_wavelength must be finite and >= 0 (0: default pattern), "
                             f"got {self.detail_wavelength}")

    @property
    def novel_expression_sequences(self) -> list[str]:
        """The sequences that show a person's withheld expression (`novel_expressions`)."""
        return sorted(self.sequence_names)[len(self.sequence_names) - self.novel_expressions:] \
            if self.novel_expressions else []

    @property
    def person_ids(self) -> list[str]:
        return [f"{i:03d}" for i in range(self.persons)]

    @property
    def sequence_names(self) -> list[str]:
        return list(SEQUENCE_NAMES[: self.sequences])

    @property
    def serials(self) -> list[str]:
        """Camera serials used: the frontal one plus the next ones in dome order."""
        frontal = NERSEMBLE_SERIALS.index(FRONTAL_SERIAL)
        order = [frontal] + [i for i in range(16) if NERSEMBLE_SERIALS[i] != FRONTAL_SERIAL]
        return sorted(NERSEMBLE_SERIALS[i] for i in order[: self.cameras])


def dome_camera(serial: str, size: int, distance: float) -> Camera:
    """An OpenCV camera on the dome looking at the head centre."""
    az, el = np.deg2rad(_DOME[NERSEMBLE_SERIALS.index(serial)])
    eye = distance * np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    forward = -eye / np.linalg.norm(eye)  # camera z
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)  # camera x
    down = np.cross(forward, right)  # camera y (OpenCV: y down)
    R = np.stack([right, down, forward])
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ eye
    focal = size * 3.9 * distance  # the head (~0.22 m) fills ~85% of the frame
    K = np.array([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]])
    return Camera(serial, K, w2c, size, size)


def expression_trajectory(rng: np.random.Generator, sequence: str, frames: int, dim: int) -> np.ndarray:
    """Smooth expression codes (frames, dim) for one sequence."""
    emphasis = _EMPHASIS.get(sequence, tuple(range(H.N_NAMED_EXPRESSIONS)))  # EMO sequences: everything
    amp = np.full(dim, 0.35)
    amp[list(APPEARANCE_ONLY)] = 0.8  # people look around and open their mouths in every sequence
    amp[list(emphasis)] = 1.0
    t = np.arange(frames) / max(frames, 1)
    freq = rng.uniform(0.5, 1.5, dim)
    phase = rng.uniform(0, 2 * np.pi, dim)
    codes = amp * np.sin(2 * np.pi * freq * t[:, None] + phase)
    codes[:, H.JAW] = np.clip(codes[:, H.JAW] * 0.5 + 0.45 * amp[H.JAW], 0.0, 1.0)
    codes[:, H.BLINK] = np.clip(codes[:, H.BLINK], 0.0, 1.0) ** 2
    codes[:, H.TONGUE] *= 1.5
    return codes.astype(np.float32)


#: `novel_expressions`: the expression a person's training sequences never show, by person index.
WITHHELD = (H.JAW, H.BLINK)
#: Ear fold of `folded_ears` (radians; see head.fold_ears).
EAR_FOLD = 0.6


def withheld_dim(person: str) -> int:
    """The expression dim `novel_expressions` withholds from `person`'s training sequences."""
    index = int(person) if person.isdigit() else stable_seed(person)
    return WITHHELD[index % len(WITHHELD)]


def withhold_expression(codes: np.ndarray, dim: int, shown: bool) -> np.ndarray:
    """Codes (frames, dim) with ``dim`` held at most 0.1 (not shown: mouth closed / eyes open) or
    between 0.55 and 0.95 in every frame (shown: mouth wide open / eyes closed)."""
    out = codes.copy()
    n = len(out)
    out[:, dim] = (0.55 + 0.4 * np.abs(np.sin(np.pi * (np.arange(n) + 0.5) / n))) if shown \
        else np.clip(out[:, dim], 0.0, 0.1)
    return out


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level fixed so the files are byte-identical across runs; 1, not PIL's 6: half the CPU
    # per image (~0.7 vs ~1.4 ms for a 128 x 128 view, 1536 images per person) for files 1-4% larger.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any parts (stable across processes and runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass
class PersonModel:
    """Everything needed to render one synthetic person."""

    identity: H.Identity
    dirs: np.ndarray
    faces: np.ndarray
    neutral: np.ndarray
    cameras: dict[str, Camera] = field(default_factory=dict)

    @staticmethod
    def build(config: SyntheticConfig, person: str) -> "PersonModel":
        rng = np.random.default_rng(stable_seed(config.seed, person, "identity"))
        ident = H.Identity.sample(rng, config.expression_dim, look=int(person) if person.isdigit() else None)
        if config.detail_wavelength:  # the same draws, rescaled to the requested mean wavelength
            scale = 2 * np.pi / config.detail_wavelength / ident.detail_freq.mean()
            ident = dataclasses.replace(ident, detail_freq=ident.detail_freq * scale)
        if config.folded_ears:
            ident = dataclasses.replace(ident, ear_fold=EAR_FOLD)
        dirs, faces = H.sphere_mesh(config.n_lat, config.n_lon)
        cams = {s: dome_camera(s, config.image_size, config.camera_distance) for s in config.serials}
        return PersonModel(ident, dirs, faces, H.neutral_head(dirs, ident), cams)

    def true_vertices(self, expr: np.ndarray) -> np.ndarray:
        return self.neutral + H.expression_offsets(self.dirs, self.neutral, self.identity, expr)

    def canonical(self, expr: np.ndarray) -> np.ndarray:
        """(V, 5): neutral position / CANONICAL_SCALE (3) + ambient dims (2)."""
        return np.concatenate([self.neutral / H.CANONICAL_SCALE, H.ambient_coords(self.dirs, expr)], 1)

    def render(
        self, vertices: np.ndarray, expr: np.ndarray, camera: Camera, camera_index: int,
        hair_phase: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth RGB (H, W, 3) uint8 over the backdrop and alpha (H, W) uint8 (``hair_phase``:
        see texture.base_colour)."""
        v, f, attrs = self._raster_inputs(vertices)
        buf = rasterize(v, f, camera, attributes=attrs, backend="cpu")
        return self._image(buf, expr, camera, camera_index, hair_phase)

    def render_views(self, vertices: np.ndarray, expr: np.ndarray,
                     hair_phase: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """`render` for every camera, in `cameras` order (the rasterizer's per-mesh work done once)."""
        v, f, attrs = self._raster_inputs(vertices)
        bufs = rasterize_views(v, f, list(self.cameras.values()), attributes=attrs, backend="cpu")
        return [self._image(b, expr, cam, i, hair_phase)
                for i, (b, cam) in enumerate(zip(bufs, self.cameras.values()))]

    def _raster_inputs(self, vertices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attrs = np.concatenate([self.dirs, self.neutral / H.CANONICAL_SCALE], 1)
        return (torch.from_numpy(vertices).float(), torch.from_numpy(self.faces).long(),
                torch.from_numpy(attrs).float())

    def _image(self, buf: RasterBuffers, expr: np.ndarray, camera: Camera, camera_index: int,
               hair_phase: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        mask = buf.mask.numpy()
        rgb = background(camera.height, camera.width, camera_index)
        if mask.any():
            a = buf.attributes.numpy()[mask].astype(np.float64)
            n_cam = buf.normals.numpy()[mask].astype(np.float64)
            n_world = n_cam @ camera.world_to_cam[:3, :3]  # R^T n, row-vector form
            rgb[mask] = shade(albedo(a[:, :3], a[:, 3:], self.identity, expr, hair_phase), n_world)
        return (np.round(rgb * 255)).astype(np.uint8), (mask * 255).astype(np.uint8)


def generate_person(config: SyntheticConfig, person: str, folder: Path) -> None:
    """Write `person`'s capture (calibration, tracking meshes, images, alpha maps) into `folder`, laid out as a
    person folder of a capture root; `generate` passes a fresh one, so nothing of an older capture stays."""
    folder = Path(folder)
    capture = PersonCapture(folder.parent, folder.name)
    model = PersonModel.build(config, person)
    Calibration(model.cameras).save(capture.calibration_path)
    TrackingMeta(expression_dim=config.expression_dim, mesh_kind="nphm").save(capture.tracking_meta_path)
    for seq in config.sequence_names:
        rng = np.random.default_rng(stable_seed(config.seed, person, seq))
        codes = expression_trajectory(rng, seq, config.frames, config.expression_dim)
        if config.novel_expressions:
            codes = withhold_expression(codes, withheld_dim(person), seq in config.novel_expression_sequences)
        for t, expr in enumerate(codes):
            true_v = model.true_vertices(expr)
            fit_rng = np.random.default_rng(stable_seed(config.seed, person, seq, t, "fit"))
            fitted = H.smooth_and_perturb(true_v, model.faces, fit_rng, config.fit_smoothing, config.fit_noise)
            MeshFrame(fitted.astype(np.float32), model.faces, model.canonical(expr).astype(np.float32),
                      expr).save(capture.mesh_path(seq, t))
            # one phase per frame, the same for every camera (one state of the hair), from a seed of its own
            hair = np.random.default_rng(stable_seed(config.seed, person, seq, t, "hair")).uniform(0, 2 * np.pi) \
                if config.stochastic_hair else None
            for serial, (rgb, alpha) in zip(model.cameras, model.render_views(true_v, expr, hair)):
                atomic_write_bytes(capture.image_path(seq, t, serial), _png_bytes(rgb))
                atomic_write_bytes(capture.alpha_path(seq, t, serial), _png_bytes(alpha))


#: A person's generator settings, written last into its folder: the person is complete.
MARKER = "synthetic.json"

#: The ablation-data options: recorded in a person's ``synthetic.json`` only when set, so the
#: default data set's files (markers included) stay what they were before the options existed.
ABLATION_OPTIONS = ("stochastic_hair", "detail_wavelength", "folded_ears", "novel_expressions")


#: Bumped whenever the generator writes other data for the same settings (a generator change the golden test
#: `tests/shards/test_synthetic.py` flags): a person generated before is then generated again, not kept because
#: its settings match. Recorded in ``synthetic.json`` from 2 on, so the data written before it existed stays valid.
GENERATOR_VERSION = 1


def marker_spec(config: SyntheticConfig, person: str) -> dict:
    """What a complete person's ``synthetic.json`` holds: its settings and person id (and the generator's version
    from 2 on)."""
    spec = {"config": marker_config(config), "person": person}
    if GENERATOR_VERSION != 1:
        spec["generator"] = GENERATOR_VERSION
    return spec


def marker_config(config: SyntheticConfig) -> dict:
    """``asdict(config)`` without the ablation options that are at their defaults."""
    default = SyntheticConfig()
    return {k: v for k, v in asdict(config).items() if k not in ABLATION_OPTIONS or v != getattr(default, k)}


def generate(config: SyntheticConfig, root: Path, persons: list[str] | None = None) -> list[str]:
    """Generate every person (or the given subset) under `root`; returns the person ids.

    A person whose folder holds a `synthetic.json` with the same config (and generator version) is skipped, so
    re-running is cheap and an interrupted run resumes with the unfinished persons; any other
    person folder is replaced as a whole once its new capture is complete.
    """
    root = Path(root)
    done = []
    for person in persons or config.person_ids:
        marker = root / person / MARKER
        spec = marker_spec(config, person)
        if read_marker(marker) == spec:
            done.append(person)
            continue
        # Built beside the person's folder and swapped in whole, marker included: a run with another config
        # leaves none of the old sequences or frames behind, and an interrupted one leaves no partial person.
        with atomic_directory(root / person) as tmp:
            generate_person(config, person, tmp)
            atomic_write_json(tmp / MARKER, spec)
        done.append(person)
    return done
