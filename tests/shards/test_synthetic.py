from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.contract import Calibration, MeshFrame, PersonCapture, TrackingMeta, find_persons
from shards.raster import rasterize
from shards.synthetic import FRONTAL_SERIAL, SyntheticConfig, generate
from shards.synthetic import head as H
from shards.synthetic.generate import (
    ABLATION_OPTIONS,
    PersonModel,
    marker_config,
    stable_seed,
    withheld_dim,
    withhold_expression,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tiny_captures, tmp_path, tiny_cfg):
    again = tmp_path / "again"
    generate(tiny_cfg, again)
    assert tree_digest(again) == tree_digest(tiny_captures)


def test_seed_changes_data(tiny_captures, tmp_path, tiny_cfg):
    other = tmp_path / "other"
    generate(replace(tiny_cfg, persons=1, seed=8), other)
    a, b = tree_digest(tiny_captures), tree_digest(other)
    shared = [k for k in b if k in a and k.endswith(".png")]
    assert shared and all(a[k] != b[k] for k in shared if "images" in k)


def test_layout_follows_contract(tiny_captures, tiny_cfg):
    cap = PersonCapture(tiny_captures, "000")
    calib = Calibration.load(cap.calibration_path)
    assert FRONTAL_SERIAL in calib.serials and len(calib.serials) == tiny_cfg.cameras
    meta = TrackingMeta.load(cap.tracking_meta_path)
    assert meta.expression_dim == tiny_cfg.expression_dim and meta.canonical_dim == 5
    assert cap.sequences() == sorted(tiny_cfg.sequence_names)
    for seq in cap.sequences():
        assert cap.timesteps(seq) == list(range(tiny_cfg.frames)) == cap.mesh_timesteps(seq)
        for t in cap.timesteps(seq):
            assert cap.image_serials(seq, t) == calib.serials
            mesh = MeshFrame.load(cap.mesh_path(seq, t))
            mesh.validate(cap.mesh_path(seq, t), meta)
            assert len(mesh.faces) == 2 * tiny_cfg.n_lon * (tiny_cfg.n_lat - 1)


def test_regenerating_with_another_config_leaves_nothing_of_the_old_capture(capture_copy, tiny_cfg):
    smaller = replace(tiny_cfg, persons=1, sequences=tiny_cfg.sequences - 1, frames=1, seed=8)
    generate(smaller, capture_copy, ["000"])
    cap = PersonCapture(capture_copy, "000")
    assert cap.sequences() == sorted(smaller.sequence_names)
    assert all(cap.timesteps(s) == [0] for s in cap.sequences())
    assert json.loads((capture_copy / "000" / "synthetic.json").read_text())["config"] == marker_config(smaller)


def test_an_interrupted_person_leaves_its_old_capture_whole(capture_copy, tiny_cfg, monkeypatch):
    G = importlib.import_module("shards.synthetic.generate")  # the package's `generate` is the function
    before = tree_digest(capture_copy / "000")

    def dies_halfway(config, person, folder):
        Calibration(G.PersonModel.build(config, person).cameras).save(PersonCapture(folder.parent, folder.name)
                                                                      .calibration_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "generate_person", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        generate(replace(tiny_cfg, seed=8), capture_copy, ["000"])
    assert tree_digest(capture_copy / "000") == before
    assert sorted(p.name for p in capture_copy.iterdir()) == sorted(tiny_cfg.person_ids)


def test_a_temporary_person_folder_left_by_a_killed_writer_is_no_person(capture_copy, tiny_cfg):
    shutil.copytree(capture_copy / "000", capture_copy / ".000.tmp-abc")  # what SIGKILL mid-swap leaves
    assert find_persons(capture_copy) == sorted(tiny_cfg.person_ids)


def test_frontal_camera_sees_the_face(tiny_cfg):
    cfg = replace(tiny_cfg, image_size=64)
    model = PersonModel.build(cfg, "000")
    cam = model.cameras[FRONTAL_SERIAL]
    nose_tip = model.neutral[np.argmax(model.neutral[:, 2])]
    u, v = cam.project(nose_tip[None])[0]
    assert abs(u - 31.5) < 2 and 31.5 < v < 48  # nose slightly below the image centre


def test_default_mesh_has_tens_of_thousands_of_faces():
    cfg = SyntheticConfig()
    assert 2 * cfg.n_lon * (cfg.n_lat - 1) >= 20_000


def _render(model: PersonModel, expr: np.ndarray, serial=FRONTAL_SERIAL):
    rgb, alpha = model.render(model.true_vertices(expr), expr, model.cameras[serial], 0)
    return rgb.astype(np.float64), alpha


@pytest.mark.parametrize("dim", [H.TONGUE, H.GAZE_X, H.GAZE_Y])
def test_appearance_only_dims_change_image_not_mesh(dim, tiny_cfg):
    model = PersonModel.build(replace(tiny_cfg, image_size=96, n_lat=48, n_lon=64), "000")
    base = np.zeros(tiny_cfg.expression_dim, np.float32)
    base[H.JAW] = 0.8  # mouth open so the interior is visible
    moved = base.copy()
    moved[dim] = 1.5 if dim != H.TONGUE else -2.0
    base[dim] = -1.0 if dim != H.TONGUE else 2.0
    np.testing.assert_array_equal(model.true_vertices(base), model.true_vertices(moved))
    np.testing.assert_array_equal(model.canonical(base), model.canonical(moved))
    a, alpha_a = _render(model, base)
    b, alpha_b = _render(model, moved)
    np.testing.assert_array_equal(alpha_a, alpha_b)
    assert np.abs(a - b).max() > 40  # a clearly visible colour change


@pytest.mark.parametrize("dim", [H.TONGUE, H.GAZE_X, H.GAZE_Y])
def test_appearance_only_dims_are_visible_at_the_training_resolution(dim):
    """At the tiny preset's 64x64 an appearance-only dim moves whole pixels (eyes ~8 px wide,
    the iris ~1.6 px per unit of gaze, the mouth interior a band of pixels), so a model without
    expression conditioning must lose measurably (benchmarks/bench_expression_effect.py)."""
    cfg = SyntheticConfig(image_size=64, n_lat=60, n_lon=96)
    model = PersonModel.build(cfg, "001")
    expr = np.zeros(cfg.expression_dim, np.float32)
    expr[H.JAW] = 0.5
    low, high = expr.copy(), expr.copy()
    low[dim], high[dim] = -0.8, 0.8
    a, alpha = _render(model, low)
    b, _ = _render(model, high)
    changed = (np.abs(a - b).max(-1) > 0.1 * 255) & (alpha > 0)
    # measured: tongue 62, gaze x 41, gaze y 45 pixels (the earlier 6 px eyes: 44, 18, 26)
    assert changed.sum() >= 30, changed.sum()


def test_persons_differ_at_a_glance(tiny_cfg):
    """Skin and hair come from distinct palettes: the default persons are not alike."""
    idents = [PersonModel.build(tiny_cfg, f"{i:03d}").identity for i in range(8)]
    pairs = [(a, b) for i, a in enumerate(idents) for b in idents[i + 1:]]
    distinct = [np.abs(a.skin - b.skin).max() > 0.1 or np.abs(a.hair - b.hair).max() > 0.1 for a, b in pairs]
    assert all(distinct)


def test_jaw_moves_mesh_and_sets_ambient_near_mouth_only(tiny_cfg):
    model = PersonModel.build(tiny_cfg, "000")
    closed = np.zeros(tiny_cfg.expression_dim, np.float32)
    opened = closed.copy()
    opened[H.JAW] = 1.0
    moved = np.linalg.norm(model.true_vertices(opened) - model.true_vertices(closed), axis=1)
    assert moved.max() > 0.01  # centimetres
    amb = model.canonical(opened)[:, 3:]
    assert np.abs(model.canonical(closed)[:, 3:]).max() == 0
    near_mouth = model.dirs @ (np.array(H.MOUTH) / np.linalg.norm(H.MOUTH)) > 0.97
    back = model.dirs[:, 2] < -0.5
    assert amb[near_mouth, 0].min() > 0.5 and np.abs(amb[back]).max() < 1e-3


def test_fitted_mesh_differs_from_truth_slightly(tiny_captures, tiny_cfg):
    cap = PersonCapture(tiny_captures, "000")
    seq = cap.sequences()[0]
    fitted = MeshFrame.load(cap.mesh_path(seq, 0))
    model = PersonModel.build(tiny_cfg, "000")
    true_v = model.true_vertices(fitted.expression)
    err = np.linalg.norm(fitted.vertices - true_v, axis=1)
    assert 1e-4 < err.mean() < 3e-3  # sub-millimetre to millimetres, not identical


def test_config_validation():
    with pytest.raises(ValueError, match="expression_dim"):
        SyntheticConfig(expression_dim=4)
    with pytest.raises(ValueError, match="cameras"):
        SyntheticConfig(cameras=17)


@pytest.mark.parametrize("blink", [0.0, 0.6])
def test_eyes_drawn_near_the_eyes_only_equal_eyes_drawn_everywhere(tiny_cfg, blink):
    # albedo draws each eye only where its weights can be non-zero; drawing it over every point
    # (what it did before) must give the same colours bit for bit.
    from shards.synthetic import texture as T

    rng = np.random.default_rng(3)
    near_eyes = np.concatenate([T._unit(e) + rng.normal(0, 0.08, (2000, 3)) for e in T.EYES])
    dirs = np.concatenate([rng.normal(size=(4000, 3)), near_eyes])
    canonical = rng.normal(0, 0.5, dirs.shape)
    expr = rng.normal(0, 0.8, tiny_cfg.expression_dim)
    expr[H.BLINK] = blink
    ident = PersonModel.build(tiny_cfg, "002").identity
    unit = dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-8)  # albedo's normalisation
    ref = T.base_colour(unit, canonical, ident, expr)
    gaze, b = T.eye_pose(expr)
    for e in T.EYES:
        d = unit - T._unit(e)
        ref = T.draw_eye(ref, d, np.linalg.norm(d, axis=1), gaze, b, ident)
    got = T.albedo(dirs, canonical, ident, expr)
    changed = (np.clip(ref, 0, 1) != np.clip(T.base_colour(unit, canonical, ident, expr), 0, 1)).any(1)
    assert changed.sum() > 500  # the eyes are drawn, over many points
    np.testing.assert_array_equal(got, np.clip(ref, 0, 1))


def test_mesh_files_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    mesh = MeshFrame(rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 50, (80, 3)).astype(np.int32),
                     rng.normal(size=(50, 5)).astype(np.float32), rng.normal(size=16).astype(np.float32))
    mesh.save(tmp_path / "m.npz")
    back = MeshFrame.load(tmp_path / "m.npz")
    for name in ("vertices", "faces", "canonical", "expression"):
        a, b = getattr(mesh, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.npz") as z:  # np.savez_compressed's layout, deflated
        assert sorted(z.namelist()) == ["canonical.npy", "expression.npy", "faces.npy", "vertices.npy"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())


# The ablation-data options (benchmarks/bench_ablations.py); every one is off by default.

#: `_content_sha256` of `_GOLDEN_CFG`'s capture root, computed with the generator before the ablation
#: options existed (and checked against that generator's byte-level sha256, bcff85ff...): the main job's data
#: set (markers included) must stay identical whatever options are added.
_GOLDEN_CFG = SyntheticConfig(persons=1, sequences=2, frames=1, cameras=2, image_size=32, n_lat=20, n_lon=24,
                              expression_dim=10, seed=5)
_GOLDEN_SHA256 = "6ea4034f0567f68a7f3dee380d7c917985c3f4a476dc785b00aa38fb7eb0c0c2"


def _content_sha256(root: Path) -> str:
    """sha256 over a capture root's files (relative path + content, sorted), a PNG's content being its
    decoded pixels (mode, size, bytes): the images are lossless, so how hard zlib squeezed them is not data."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            if p.suffix == ".png":
                with Image.open(p) as image:
                    h.update(f"{image.mode} {image.size}".encode())
                    h.update(image.tobytes())
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


def test_default_data_set_is_identical_to_before_the_ablation_options(tmp_path):
    generate(_GOLDEN_CFG, tmp_path)
    assert _content_sha256(tmp_path) == _GOLDEN_SHA256
    marker = json.loads((tmp_path / "000" / "synthetic.json").read_text())
    assert not set(ABLATION_OPTIONS) & set(marker["config"])


def test_ablation_options_are_recorded_and_read_back(tmp_path):
    cfg = replace(_GOLDEN_CFG, folded_ears=True, novel_expressions=1)
    spec = marker_config(cfg)
    assert spec["folded_ears"] is True and spec["novel_expressions"] == 1 and "stochastic_hair" not in spec
    assert SyntheticConfig(**spec) == cfg


def test_stochastic_hair_changes_hair_only_and_differs_per_frame():
    cfg = replace(_GOLDEN_CFG, image_size=64, n_lat=40, n_lon=64, stochastic_hair=True)
    model = PersonModel.build(cfg, "000")
    expr = np.zeros(cfg.expression_dim, np.float32)
    v = model.true_vertices(expr)
    cam = model.cameras[FRONTAL_SERIAL]
    a, alpha = model.render(v, expr, cam, 0, hair_phase=0.0)
    b, _ = model.render(v, expr, cam, 0, hair_phase=np.pi)
    changed = np.abs(a.astype(int) - b.astype(int)).max(-1) > 20
    buf = rasterize(torch.from_numpy(v).float(), torch.from_numpy(model.faces).long(), cam,
                    attributes=torch.from_numpy(model.dirs).float(), backend="cpu")
    top = (buf.attributes[..., 1].numpy() > model.identity.hairline + 0.08) & buf.mask.numpy()
    assert changed.sum() > 50 and changed[top].mean() > 0.3  # the strands, visible at 64x64
    face = (buf.attributes[..., 2].numpy() > 0.8) & (buf.attributes[..., 1].numpy() < 0.2) & buf.mask.numpy()
    assert face.sum() > 50 and not changed[face].any()  # the face is untouched
    # the generator draws one phase per frame: the frames of one sequence differ in the hair
    phases = {np.random.default_rng(stable_seed(cfg.seed, "000", "s", t, "hair")).uniform(0, 2 * np.pi)
              for t in range(4)}
    assert len(phases) == 4


def test_detail_wavelength_rescales_the_skin_pattern():
    default = PersonModel.build(_GOLDEN_CFG, "000").identity
    coarse = PersonModel.build(replace(_GOLDEN_CFG, detail_wavelength=0.25), "000").identity
    assert 2 * np.pi / coarse.detail_freq.mean() == pytest.approx(0.25)
    np.testing.assert_allclose(coarse.detail_freq / default.detail_freq, coarse.detail_freq[0] / default.detail_freq[0])
    with pytest.raises(ValueError, match="detail_wavelength"):
        SyntheticConfig(detail_wavelength=-1)


def _equator_azimuth(model: PersonModel) -> np.ndarray:
    ring = np.flatnonzero(np.abs(model.dirs[:, 1]) == np.abs(model.dirs[:, 1]).min())
    ring = ring[np.argsort(np.arctan2(model.dirs[ring, 0], model.dirs[ring, 2]))]  # material order
    return np.unwrap(np.arctan2(model.neutral[ring, 0], model.neutral[ring, 2]))


def test_folded_ears_make_the_head_not_star_shaped():
    """Along the equator the surface's azimuth turns back at the ears (a fold: two surface points on
    one ray from the centre), while the default head's azimuth rises monotonically."""
    cfg = replace(_GOLDEN_CFG, n_lat=21, n_lon=96)
    default = PersonModel.build(cfg, "000")
    assert (np.diff(_equator_azimuth(default)) > 0).all()
    folded = PersonModel.build(replace(cfg, folded_ears=True), "000")
    assert (np.diff(_equator_azimuth(folded)) < 0).sum() >= 4  # both ears fold
    ear = H.ear_weight(folded.dirs) > 0.5
    lift = np.linalg.norm(folded.neutral[ear], axis=1) / np.linalg.norm(default.neutral[ear], axis=1)
    assert lift.min() > 1.14  # the flap stands off the head


def test_novel_expressions_are_withheld_from_training_sequences():
    cfg = SyntheticConfig(sequences=6, novel_expressions=2)
    assert cfg.novel_expression_sequences == ["EXP-3-cheeks+nose", "EXP-4-lips"]  # the ingest's held-out pair
    assert withheld_dim("000") == H.JAW and withheld_dim("001") == H.BLINK
    rng = np.random.default_rng(0)
    codes = rng.uniform(-1, 1, (8, cfg.expression_dim)).astype(np.float32)
    hidden = withhold_expression(codes, H.JAW, shown=False)
    shown = withhold_expression(codes, H.JAW, shown=True)
    assert hidden[:, H.JAW].max() <= 0.1 and shown[:, H.JAW].min() >= 0.55
    other = [d for d in range(cfg.expression_dim) if d != H.JAW]
    np.testing.assert_array_equal(hidden[:, other], codes[:, other])
    with pytest.raises(ValueError, match="novel_expressions"):
        SyntheticConfig(sequences=2, novel_expressions=2)


def test_novel_expressions_in_the_written_capture(tmp_path):
    cfg = replace(_GOLDEN_CFG, sequences=3, frames=2, cameras=1, novel_expressions=1)
    generate(cfg, tmp_path)
    cap = PersonCapture(tmp_path, "000")
    novel = cfg.novel_expression_sequences
    for seq in cap.sequences():
        jaw = [MeshFrame.load(cap.mesh_path(seq, t)).expression[H.JAW] for t in range(cfg.frames)]
        assert (min(jaw) >= 0.55) if seq in novel else (max(jaw) <= 0.1), (seq, jaw)


def _fitted_and_true(root: Path, **changes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fitted, true vertices, faces) of the one frame of a one-frame capture written with `changes`."""
    cfg = replace(_GOLDEN_CFG, sequences=1, cameras=1, image_size=16, **changes)
    generate(cfg, root)
    cap = PersonCapture(root, "000")
    fitted = MeshFrame.load(cap.mesh_path(cap.sequences()[0], 0))
    return fitted.vertices.astype(np.float64), PersonModel.build(cfg, "000").true_vertices(fitted.expression), \
        fitted.faces


def _roughness(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Mean distance of a vertex from the mean of its edge neighbours (the fine geometry smoothing removes)."""
    src = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    dst = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    deg = np.bincount(src, minlength=len(vertices))[:, None]
    mean = np.stack([np.bincount(src, weights=vertices[dst, k], minlength=len(vertices)) for k in range(3)], 1) / deg
    return float(np.linalg.norm(vertices - mean, axis=1).mean())


def test_fit_noise_and_fit_smoothing_shape_the_fitted_mesh(tmp_path):
    """SyntheticConfig.fit_noise is the fitted mesh's vertex noise std, fit_smoothing removes its fine geometry."""
    exact, true_v, faces = _fitted_and_true(tmp_path / "exact", fit_smoothing=0, fit_noise=0.0)
    np.testing.assert_allclose(exact, true_v, rtol=0, atol=1e-6)
    noisy, true_v, _ = _fitted_and_true(tmp_path / "noisy", fit_smoothing=0, fit_noise=0.002)
    assert abs((noisy - true_v).std() - 0.002) < 0.0002 and abs((noisy - true_v).mean()) < 0.0002
    errors, roughness = [], []
    for iterations in (0, 3, 12):
        fitted, true_v, _ = _fitted_and_true(tmp_path / f"smooth{iterations}", fit_smoothing=iterations, fit_noise=0.0)
        errors.append(np.linalg.norm(fitted - true_v, axis=1).mean())
        roughness.append(_roughness(fitted, faces))
    assert errors[0] < 1e-6 < errors[1] < errors[2], errors
    assert roughness[0] > roughness[1] > roughness[2], roughness


def test_camera_distance_places_every_camera_that_far_from_the_head(tmp_path):
    """SyntheticConfig.camera_distance: the written cameras sit that far from the head centre, looking at it."""
    cfg = replace(_GOLDEN_CFG, sequences=1, cameras=3, image_size=16, camera_distance=1.6)
    generate(cfg, tmp_path)
    calib = Calibration.load(PersonCapture(tmp_path, "000").calibration_path)
    assert len(calib.cameras) == 3
    for cam in calib.cameras.values():
        assert np.linalg.norm(cam.position) == pytest.approx(1.6)
        np.testing.assert_allclose(cam.project(np.zeros((1, 3)))[0], cam.K[:2, 2], atol=1e-9)
    default = PersonModel.build(replace(cfg, camera_distance=SyntheticConfig().camera_distance), "000")
    assert all(np.linalg.norm(c.position) == pytest.approx(1.0) for c in default.cameras.values())


@pytest.mark.parametrize("field, value", [
    ("fit_noise", -1.0), ("fit_noise", float("nan")), ("fit_smoothing", -1), ("n_lat", 1), ("n_lon", 2),
    ("camera_distance", 0.0), ("camera_distance", -1.0), ("persons", 0), ("frames", 0), ("image_size", 4),
    ("detail_wavelength", float("inf")),
])
def test_config_refuses_values_the_generator_cannot_use_naming_the_field(field, value):
    """Every SyntheticConfig field is checked when the config is built, the message naming it: a negative noise std
    (was numpy's "scale < 0" from a worker), one latitude ring too few (an IndexError), cameras at the head's
    centre (NaN cameras), ... Through jobs/make_synthetic.py's command line: exit code 2, naming the field."""
    with pytest.raises(ValueError, match=f"^{field} must be .*got {value}"):
        SyntheticConfig(**{field: value})
    SyntheticConfig(n_lat=2, n_lon=3, fit_noise=0.0, fit_smoothing=0)  # the least the generator works with


@pytest.mark.parametrize("content", ["", '{"config": {"pers'])
def test_a_damaged_marker_means_not_complete_and_the_person_is_generated_again(capture_copy, tiny_cfg, content):
    """A marker cut off (a power loss, a bad copy) made every later run stop on a JSONDecodeError naming no file."""
    marker = capture_copy / "000" / "synthetic.json"
    expected = marker.read_text()
    marker.write_text(content)
    with pytest.warns(RuntimeWarning, match=r"synthetic.json: unreadable completion marker"):
        assert generate(tiny_cfg, capture_copy, ["000"]) == ["000"]
    assert marker.read_text() == expected
