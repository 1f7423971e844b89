"""`sr-pipeline upscale` on users' images: formats, modes, sizes, tiling; inputs never overwritten."""

from __future__ import annotations

import hashlib

import fixtures_evaluate
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from pipeline.preprocess import imresize

tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def user_images(tmp_path, set5_dir):
    """Real photo crops in every mode a user may have: RGB PNG, JPEG, grey, RGBA, palette."""
    d = tmp_path / "in"
    d.mkdir()
    with Image.open(set5_dir / "butterfly.png") as im:
        rgb = im.convert("RGB").crop((30, 40, 67, 63))  # 37x23, odd
    rgb.save(d / "photo.png")
    rgb.save(d / "photo_jpeg.jpg", quality=90)
    rgb.convert("L").save(d / "grey.png")
    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(d / "palette.png")
    return d


def test_bicubic_upscale_every_mode(user_images, tmp_path):
    before = _digest(user_images)
    out = tmp_path / "out"
    proc = run_cli(
        "upscale", str(user_images), "--model", "bicubic", "--scale", "3", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "upscale x3 (Bicubic): 5 img" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha_x3.png", "grey_x3.png", "palette_x3.png", "photo_jpeg_x3.png", "photo_x3.png"
    ]  # fmt: skip
    modes = {}
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.size == (111, 69)
            modes[p.name] = im.mode
    assert modes == {"alpha_x3.png": "RGBA", "grey_x3.png": "L", "palette_x3.png": "RGB",
                     "photo_jpeg_x3.png": "RGB", "photo_x3.png": "RGB"}  # fmt: skip
    with Image.open(user_images / "photo.png") as im:
        want = imresize(np.asarray(im), scale=3)
    with Image.open(out / "photo_x3.png") as im:
        np.testing.assert_array_equal(np.asarray(im), want)
    with Image.open(user_images / "alpha.png") as im:
        want_alpha = imresize(np.asarray(im)[..., 3], scale=3)
    with Image.open(out / "alpha_x3.png") as im:
        np.testing.assert_array_equal(np.asarray(im)[..., 3], want_alpha)
    assert _digest(user_images) == before


def test_model_upscale_tiled_any_size(user_images, tiny_checkpoints, tmp_path):
    with Image.new("RGB", (3, 2), (200, 30, 60)) as im:  # smaller than DNLA's minimum token count
        im.save(user_images / "speck.png")
    with Image.open(user_images / "photo.png") as im:
        im.resize((150, 70)).save(user_images / "wide.png")  # several 32-px tiles
    out = tmp_path / "out"
    proc = run_cli(
        "upscale", str(user_images / "wide.png"), str(user_images / "speck.png"),
        str(user_images / "grey.png"), str(user_images / "alpha.png"),
        "--checkpoint", str(tiny_checkpoints.ours_x2), "--out", str(out), "--tile", "32", "--tile-overlap", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sizes = {}
    for p in out.iterdir():
        with Image.open(p) as im:
            sizes[p.name] = (im.size, im.mode)
    assert sizes == {
        "wide_x2.png": ((300, 140), "RGB"),
        "speck_x2.png": ((6, 4), "RGB"),
        "grey_x2.png": ((74, 46), "L"),
        "alpha_x2.png": ((74, 46), "RGBA"),
    }
    proc = run_cli("upscale", str(user_images / "grey.png"), "--checkpoint", str(tiny_checkpoints.ours_x2),
                   "--scale", "4", "--out", str(out))  # fmt: skip
    assert (
        proc.returncode == 1 and "checkpoint is for x2, but --scale 4 was requested" in proc.stderr
    )


def test_never_overwrites_inputs(user_images):
    # an input already named like an output, and --out pointing at the inputs' folder
    (user_images / "photo_x2.png").write_bytes((user_images / "photo.png").read_bytes())
    before = _digest(user_images)
    proc = run_cli(
        "upscale", str(user_images), "--model", "bicubic", "--scale", "2", "--out", str(user_images)
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {user_images / 'photo_x2.png'}: refusing to overwrite an input image; choose another --out"
    ]
    assert _digest(user_images) == before  # nothing written, nothing changed


def test_same_stem_from_two_folders_does_not_collide(tmp_path, user_images):
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.png").write_bytes((user_images / "grey.png").read_bytes())
    out = tmp_path / "out"
    proc = run_cli("upscale", str(user_images / "photo.png"), str(other / "photo.png"), "--model", "bicubic",
                   "--scale", "2", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["photo-2_x2.png", "photo_x2.png"]


def test_bad_inputs_are_one_line(tmp_path, user_images):
    bad = user_images / "broken.png"
    data = (user_images / "photo.png").read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated download
    cases = [
        (
            [str(bad), "--model", "bicubic", "--scale", "2"],
            f"error: {bad}: corrupt or truncated image",
        ),
        ([str(tmp_path / "missing.png")], f"error: {tmp_path / 'missing.png'}: file not found"),
        (
            [str(user_images / "photo.png"), "--scale", "2"],
            "error: nothing to evaluate: give --checkpoint",
        ),
        (
            [str(user_images / "photo.png"), "--model", "bicubic"],
            "error: --model bicubic needs --scale",
        ),
    ]
    for args, start in cases:
        proc = run_cli("upscale", *args, "--out", str(tmp_path / "o"))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(start), proc.stderr


def test_existing_outputs_are_refused_unless_overwrite(user_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a file the user keeps in --out that happens to carry an output's name
    (out / "photo_x2.png").write_bytes((user_images / "photo.png").read_bytes())
    before = _digest(out)
    args = [str(user_images / "grey.png"), str(user_images / "photo.png"), "--model", "bicubic",
            "--scale", "2", "--out", str(out)]  # fmt: skip
    proc = run_cli("upscale", *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {out / 'photo_x2.png'}: already exists; pass --overwrite to replace it, "
        "--skip-existing to keep it, or choose another --out"
    ]
    assert _digest(out) == before  # checked before anything is written: grey_x2.png neither
    proc = run_cli("upscale", *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "photo_x2.png") as im, Image.open(user_images / "photo.png") as src:
        assert im.size == (74, 46)
        np.testing.assert_array_equal(np.asarray(im), imresize(np.asarray(src), scale=2))
    assert sorted(p.name for p in out.iterdir()) == ["grey_x2.png", "photo_x2.png"]


def test_overwrite_never_replaces_an_input(user_images):
    (user_images / "photo_x2.png").write_bytes((user_images / "photo.png").read_bytes())
    before = _digest(user_images)
    proc = run_cli("upscale", str(user_images), "--model", "bicubic", "--scale", "2",
                   "--out", str(user_images), "--overwrite")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {user_images / 'photo_x2.png'}: refusing to overwrite an input image; choose another --out"
    ]
    assert _digest(user_images) == before


def test_sixteen_bit_and_bilevel_grey_come_back_grey(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    ramp = np.add.outer(np.arange(21) * 3000, np.arange(33) * 40).astype(np.uint16)
    Image.fromarray(ramp).save(d / "deep.png")  # 16-bit greyscale PNG
    Image.fromarray(ramp > 30000).save(d / "bw.png")  # 1-bit
    with Image.open(d / "deep.png") as im:
        assert im.mode.startswith("I")  # a 16-bit mode, not "L"
    out = tmp_path / "out"
    proc = run_cli("upscale", str(d), "--model", "bicubic", "--scale", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "deep_x2.png") as im:
        assert (im.mode, im.size) == ("L", (66, 42))
        eight = np.clip(np.round(ramp * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(im), imresize(eight, scale=2))
    with Image.open(out / "bw_x2.png") as im:
        assert (im.mode, im.size) == ("L", (66, 42))


def test_output_paths_checks_without_writing(tmp_path, user_images):
    from pipeline.console import UserError
    from pipeline.evaluate.photos import output_paths

    photo = user_images / "photo.png"
    as_file = tmp_path / "not_a_folder"
    as_file.write_bytes(b"x")
    with pytest.raises(UserError) as err:
        output_paths([photo], as_file, 2)
    assert str(err.value) == f"{as_file}: --out is a file, not a folder; choose another --out"
    out = tmp_path / "out"
    assert output_paths([photo], out, 2) == [out / "photo_x2.png"]
    assert not out.exists()  # checking creates nothing
    out.mkdir()
    (out / "photo_x2.png").mkdir()  # a folder can never be replaced, even with --overwrite
    with pytest.raises(UserError, match=r"photo_x2.png: a folder has the output's name"):
        output_paths([photo], out, 2, overwrite=True)
    (out / "photo_x2.png").rmdir()
    (out / "photo_x2.png").write_bytes(b"old")
    with pytest.raises(UserError, match=r"photo_x2.png: already exists; pass --overwrite"):
        output_paths([photo], out, 2)
    assert output_paths([photo], out, 2, overwrite=True) == [out / "photo_x2.png"]
    assert (out / "photo_x2.png").read_bytes() == b"old"
