"""jobs/convert_nersemble.py on a small fake NeRSemble download, then the ingest on its output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.io import DataError
from jobs.convert_nersemble import ConvertArgs, main
from shards.contract import Calibration, MeshFrame, PersonCapture
from shards.nersemble import DONE_MARKER, ConvertConfig, convert_person

SERIALS = ("222200036", "222200037")
FULL = (80, 120)  # (width, height) the intrinsics refer to
HALF = (40, 60)  # the images-2x size


def _fake_download(root: Path, kind: str = "nphm", timesteps: int = 7) -> tuple[Path, Path]:
    """1 participant, 2 sequences, `timesteps` timesteps, 2 cameras; tracking for every 3rd."""
    src, trk = root / "nersemble" / "017", root / "tracking" / "017"
    K = [[100.0, 0, 39.5], [0, 100.0, 59.5], [0, 0, 1]]
    w2c = {s: np.eye(4).tolist() for s in SERIALS}
    for s in SERIALS:
        w2c[s][2][3] = 1.0 + 0.1 * SERIALS.index(s)
    (src / "calibration").mkdir(parents=True)
    (src / "calibration" / "camera_params.json").write_text(json.dumps({"world_2_cam": w2c, "intrinsics": K}))
    trk.mkdir(parents=True)
    dim = 7 if kind == "nphm" else 5 + 3 + 6
    (trk / "meta.json").write_text(json.dumps({"mesh_kind": kind, "expression_dim": dim}))
    rng = np.random.default_rng(0)
    verts = rng.normal(scale=0.05, size=(30, 3))
    faces = rng.integers(0, 30, (40, 3))
    for seq in ("EXP-1-head", "EMO-1-shout+laugh"):
        for t in range(timesteps):
            fdir = src / "sequences" / seq / "timesteps" / f"frame_{t:05d}"
            for s in SERIALS:
                (fdir / "images-2x").mkdir(parents=True, exist_ok=True)
                (fdir / "alpha_map").mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 256, (HALF[1], HALF[0], 3), dtype=np.uint8)
                Image.fromarray(img).save(fdir / "images-2x" / f"cam_{s}.jpg", quality=95)
                Image.fromarray(np.full(FULL[::-1], 255, np.uint8)).save(fdir / "alpha_map" / f"cam_{s}.png")
            if t % 3 == 0:
                (trk / seq).mkdir(exist_ok=True)
                if kind == "nphm":
                    np.savez(trk / seq / f"frame_{t:05d}.npz", vertices=verts + t, faces=faces,
                             canonical=rng.normal(size=(30, 5)), expression=np.full(dim, t, np.float32))
                else:
                    np.savez(trk / seq / f"frame_{t:05d}.npz", vertices=verts + t, template_vertices=verts,
                             expression=np.full(5, t, np.float32), jaw_pose=np.zeros(3), eyes_pose=np.ones(6))
    if kind == "flame":
        np.save(trk / "faces.npy", faces)
    return root / "nersemble", root / "tracking"


def test_converts_every_third_timestep_with_scaled_intrinsics(tmp_path):
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    assert main(ConvertArgs(config)) == {"017": "converted"}
    capture = PersonCapture(out, "017")
    assert capture.sequences() == ["EMO-1-shout+laugh", "EXP-1-head"]
    assert capture.timesteps("EXP-1-head") == [0, 3, 6]  # every 3rd of the 73 fps capture
    calib = Calibration.load(capture.calibration_path)
    cam = calib.cameras["222200037"]
    assert (cam.width, cam.height) == HALF
    # half size: the image centre stays the centre
    np.testing.assert_allclose(cam.K, [[50, 0, 19.5], [0, 50, 29.5], [0, 0, 1]])
    img = Image.open(capture.image_path("EXP-1-head", 3, "222200037"))
    alpha = Image.open(capture.alpha_path("EXP-1-head", 3, "222200037"))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == HALF and alpha.size == HALF and alpha.mode == "L"
    mesh = MeshFrame.load(capture.mesh_path("EXP-1-head", 6))
    assert mesh.canonical.shape == (30, 5) and np.all(mesh.expression == 6)
    assert main(ConvertArgs(config)) == {"017": "skipped"}  # complete for the same settings

    # the output is a valid capture: the ingest accepts it
    from shards.ingest import IngestConfig, ingest_person

    ingest_person(out, "017", tmp_path / "zarr", IngestConfig(held_out_sequences=1, held_out_camera="222200037"))
    assert (tmp_path / "zarr" / "017.zarr").exists()


def test_flame_tracking_uses_template_vertices_and_appends_poses(tmp_path):
    nersemble, tracking = _fake_download(tmp_path, kind="flame", timesteps=4)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    assert convert_person(config, "017", progress=False) == "converted"
    mesh = MeshFrame.load(PersonCapture(out, "017").mesh_path("EXP-1-head", 3))
    assert mesh.canonical.shape == (30, 3) and mesh.expression.shape == (14,)
    np.testing.assert_array_equal(mesh.expression, [3] * 5 + [0] * 3 + [1] * 6)


def test_errors_name_the_file_and_nothing_is_written(tmp_path):
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    broken = tracking / "017" / "EXP-1-head" / "frame_00003.npz"
    broken.unlink()
    with pytest.raises(DataError, match="frame_00003.npz.*tracking file is missing"):
        convert_person(config, "017", progress=False)
    assert not out.exists()  # everything is checked before anything is written
    np.savez(broken, vertices=np.zeros((30, 3)), faces=np.zeros((1, 3), int), expression=np.zeros(7))
    with pytest.raises(DataError, match="lacks canonical"):
        convert_person(config, "017", progress=False)
    np.savez(broken, vertices=np.zeros((30, 3)), faces=np.zeros((1, 3), int), canonical=np.zeros((30, 5)),
             expression=np.zeros(9))
    with pytest.raises(DataError, match="expression code must have dimension 7"):
        convert_person(config, "017", progress=False)
    (nersemble / "017" / "calibration" / "camera_params.json").write_text("{")
    assert main(ConvertArgs(config))["017"].startswith("failed: ")


def test_persons_sequences_image_folder_and_stride_choose_what_is_converted(tmp_path):
    """--persons / --sequences / --image-folder / --frame-stride select the participants, sequences, images and
    timesteps converted; a listed participant missing from the download fails alone."""
    nersemble, tracking = _fake_download(tmp_path)
    for folder in list(nersemble.glob("017/sequences/*/timesteps/*/images-2x")):
        folder.rename(folder.with_name("images"))
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    with pytest.raises(DataError, match=r"frame_00000/images-2x.*no cam_<serial>"):
        convert_person(config, "017", progress=False)
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL, persons="017,018",
                           sequences="EXP-1-head", image_folder="images", frame_stride=6)
    results = main(ConvertArgs(config))
    assert results["017"] == "converted"
    assert results["018"].startswith("failed: ")
    assert "participant 018 is not in the NeRSemble download" in results["018"]
    capture = PersonCapture(out, "017")
    assert capture.sequences() == ["EXP-1-head"] and capture.timesteps("EXP-1-head") == [0, 6]
    assert not (out / "018").exists()


def test_converting_again_with_other_settings_replaces_the_whole_person(tmp_path):
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    assert convert_person(config, "017", progress=False) == "converted"
    fewer = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL, frame_stride=6,
                          sequences="EXP-1-head")
    assert convert_person(fewer, "017", progress=False) == "converted"
    capture = PersonCapture(out, "017")
    assert {s: capture.timesteps(s) for s in capture.sequences()} == {"EXP-1-head": [0, 6]}


def test_an_undecodable_image_fails_its_participant_alone_and_leaves_no_partial_output(tmp_path):
    nersemble, tracking = _fake_download(tmp_path)
    for root in (nersemble, tracking):
        shutil.copytree(root / "017", root / "018")
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    bad = nersemble / "017/sequences/EXP-1-head/timesteps/frame_00003/images-2x/cam_222200037.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # the header reads, the data does not
    results = main(ConvertArgs(config))
    assert results["018"] == "converted"
    assert results["017"].startswith("failed: ") and str(bad) in results["017"]
    assert sorted(p.name for p in out.iterdir()) == ["018"]  # nothing of 017, not even a temporary folder


def test_an_image_of_another_size_is_refused_before_anything_is_written(tmp_path):
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    odd = nersemble / "017/sequences/EXP-1-head/timesteps/frame_00006/images-2x/cam_222200036.jpg"
    Image.new("RGB", (HALF[0] + 2, HALF[1])).save(odd)
    with pytest.raises(DataError, match=r"cam_222200036.jpg: image size \(42, 60\) differs"):
        convert_person(config, "017", progress=False)
    assert not out.exists()


def test_16_bit_alpha_maps_are_scaled_and_other_modes_refused(tmp_path):
    """A 16-bit grey-level alpha map (PIL mode I;16) is scaled to 8 bits, not clipped (convert("L") made a 50%
    matte opaque); an alpha map that is no grey-level map (RGBA) is refused naming its mode before anything is
    written."""
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    alphas = sorted(nersemble.glob("017/sequences/*/timesteps/*/alpha_map/cam_*.png"))
    for path in alphas:
        Image.fromarray(np.full(FULL[::-1], 32768, np.uint16)).save(path)
    assert Image.open(alphas[0]).mode == "I;16"
    assert convert_person(config, "017", progress=False) == "converted"
    capture = PersonCapture(out, "017")
    converted = np.asarray(Image.open(capture.alpha_path("EXP-1-head", 0, SERIALS[0])))
    assert converted.dtype == np.uint8 and np.all(converted == 128)  # 32768 / 257 = 127.5
    Image.new("RGBA", FULL).save(alphas[0])
    with pytest.raises(DataError, match=r"cam_\d+\.png: alpha map has PIL mode RGBA"):
        convert_person(config, "017", progress=False)


def test_images_of_another_aspect_than_the_intrinsics_size_are_refused(tmp_path):
    """--convert.intrinsics-size with width and height swapped (or cropped images) would give every camera
    non-square pixels: refused naming the option and both sizes, before anything is written."""
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL[::-1])
    with pytest.raises(DataError, match=r"the images are 40x60, not 120x80 \(--convert.intrinsics-size"):
        convert_person(config, "017", progress=False)
    assert not out.exists()
    square = nersemble / "017/sequences/EXP-1-head/timesteps/frame_00003/alpha_map/cam_222200036.png"
    Image.fromarray(np.full((80, 80), 255, np.uint8)).save(square)
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    with pytest.raises(DataError, match=r"cam_222200036.png: alpha map size \(80, 80\) is not the images' \(40, 60\)"):
        convert_person(config, "017", progress=False)
    assert not out.exists()


def test_a_changed_input_converts_again_and_an_unchanged_one_is_skipped(tmp_path):
    """The conversion is up to date only while the files it read are unchanged (name, size, mtime): a tracker run
    again gives new meshes, which are converted, not kept as they were."""
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    assert convert_person(config, "017", progress=False) == "converted"
    assert convert_person(config, "017", progress=False) == "skipped"
    frame = tracking / "017" / "EXP-1-head" / "frame_00003.npz"
    with np.load(frame) as z:
        data = dict(z)
    np.savez(frame, **{**data, "expression": np.full(7, 9.0, np.float32)})
    assert convert_person(config, "017", progress=False) == "converted"
    mesh = MeshFrame.load(PersonCapture(out, "017").mesh_path("EXP-1-head", 3))
    assert np.all(mesh.expression == 9.0)


def test_a_tracking_root_that_does_not_exist_is_an_error_with_exit_code_2(tmp_path):
    """Nothing can be converted: one line naming the folder and exit code 2 (a participant that fails is 1)."""
    import subprocess
    import sys

    nersemble, _ = _fake_download(tmp_path)
    script = Path(__file__).resolve().parents[2] / "jobs" / "convert_nersemble.py"
    run = subprocess.run([sys.executable, str(script), "--convert.nersemble", str(nersemble), "--convert.tracking",
                          str(tmp_path / "nope"), "--convert.out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"error: {tmp_path / 'nope'}" in run.stderr and "Traceback" not in run.stderr


def test_the_usage_line_of_the_docstring_parses():
    """The module docstring's usage line (python jobs/convert_nersemble.py ...) uses flags the command line takes
    (it showed --nersemble / --tracking / --out / --persons, which tyro refuses: they are --convert.*)."""
    import shlex

    import tyro

    import jobs.convert_nersemble as job

    usage = job.__doc__.split("\n\n")[1].replace("\\\n", " ")
    words = shlex.split(usage)
    assert words[:2] == ["python", "jobs/convert_nersemble.py"]
    args = tyro.cli(ConvertArgs, args=words[2:])
    assert args.convert == ConvertConfig(nersemble=Path("/data/nersemble"), tracking=Path("/data/tracking"),
                                         out=Path("data/captures"), persons="017,018")


def test_a_damaged_marker_converts_the_participant_again(tmp_path):
    """A cut-off marker failed the participant on every run with a JSONDecodeError naming no file."""
    nersemble, tracking = _fake_download(tmp_path)
    out = tmp_path / "captures"
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=out, intrinsics_size=FULL)
    assert convert_person(config, "017", progress=False) == "converted"
    marker = PersonCapture(out, "017").dir / DONE_MARKER
    marker.write_text(marker.read_text()[:23])
    with pytest.warns(RuntimeWarning, match=f"{DONE_MARKER}: unreadable completion marker"):
        assert convert_person(config, "017", progress=False) == "converted"
    assert convert_person(config, "017", progress=False) == "skipped"


def test_a_participant_folder_that_is_no_person_id_is_skipped_and_a_listed_one_refused(tmp_path):
    """'017 copy' in the tracking root failed later as a person; '--convert.persons ../x' wrote outside --out."""
    from shards.nersemble import list_participants

    nersemble, tracking = _fake_download(tmp_path)
    shutil.copytree(tracking / "017", tracking / "017 copy")
    (tracking / "017" / ".ipynb_checkpoints").mkdir()  # not a sequence either
    config = ConvertConfig(nersemble=nersemble, tracking=tracking, out=tmp_path / "captures", intrinsics_size=FULL)
    with pytest.warns(RuntimeWarning, match="017 copy: skipped: '017 copy' is not a person id"):
        assert list_participants(config) == ["017"]
    assert convert_person(config, "017", progress=False) == "converted"
    with pytest.raises(ValueError, match=r"--convert.persons: '../x' is not a person id"):
        ConvertConfig(nersemble=nersemble, tracking=tracking, out=tmp_path / "captures", persons="017,../x")
