"""Image loading, path safety and image lists, on real files written with PIL."""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from elta.data.images import (
    ImageLoadError,
    list_images,
    load_image,
    read_image_size,
    resolve_image_path,
)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_rgb_jpeg_is_returned_decoded(tmp_path):
    Image.new("RGB", (32, 24), (200, 100, 50)).save(tmp_path / "a.jpg", quality=95)
    img = load_image(tmp_path / "a.jpg")
    assert (img.mode, img.size) == ("RGB", (32, 24))
    assert np.abs(np.asarray(img, dtype=int) - [200, 100, 50]).max() <= 2


def test_greyscale_jpeg_becomes_rgb(tmp_path):
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.jpg", quality=95)
    img = load_image(tmp_path / "grey.jpg")
    assert img.mode == "RGB"
    pixels = np.asarray(img, dtype=int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert abs(pixels[0, 0, 0] - 77) <= 1


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure magenta ink
    img = load_image(tmp_path / "cmyk.jpg")
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=int)[8, 8] - [255, 0, 255]).max() <= 3


def test_png_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    rgba.putpixel((2, 0), (255, 0, 0, 255))  # opaque red
    rgba.save(tmp_path / "alpha.png")
    img = load_image(tmp_path / "alpha.png")
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (127, 127, 127), (255, 0, 0)]


def test_greyscale_with_alpha_is_composited_on_white(tmp_path):
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 on the 8-bit scale
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as stored:
        assert stored.mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32bit_integer_greyscale_uses_the_16bit_scale(tmp_path):
    Image.fromarray(np.array([[0, 514, 65535]], dtype=np.int32)).save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as stored:
        assert stored.mode == "I"
    assert np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 0].tolist() == [0, 2, 255]


def test_float_greyscale_in_unit_range_maps_to_0_255(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_png_with_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)  # transparent index
    pal.putpixel((1, 0), 1)  # opaque blue
    pal.save(tmp_path / "pal.png", transparency=0)
    img = load_image(tmp_path / "pal.png")
    assert img.mode == "RGB"
    assert [img.getpixel((0, 0)), img.getpixel((1, 0))] == [(255, 255, 255), (0, 0, 255)]


def test_exif_orientation_6_is_applied(tmp_path):
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 40))  # left half red, right half blue
    exif = stored.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rotated.jpg")
    assert img.size == (40, 60)
    top, bottom = np.asarray(img, dtype=int)[5, 20], np.asarray(img, dtype=int)[55, 20]
    assert np.abs(top - [255, 0, 0]).max() <= 3 and np.abs(bottom - [0, 0, 255]).max() <= 3


def test_truncated_jpeg_raises_image_load_error(tmp_path):
    Image.effect_noise((128, 128), 64).convert("RGB").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(tmp_path / "cut.jpg")
    assert str(tmp_path / "cut.jpg") in str(info.value)
    assert info.value.path == str(tmp_path / "cut.jpg")


def test_non_image_missing_file_and_folder_raise(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match="not a recognised image file"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)


def test_max_pixels_is_checked_before_decoding(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="10000 pixels exceeds max_pixels=9999"):
        load_image(tmp_path / "small.png", max_pixels=9999)
    assert load_image(tmp_path / "small.png", max_pixels=10000).size == (100, 100)


def test_huge_header_is_refused_without_leaking_pil_warnings_or_state(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
    big = _png_header_only(tmp_path / "big.png", 12000, 12000)  # above PIL's warning threshold
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # above PIL's hard limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match="144000000 pixels exceeds max_pixels=100000000"):
            load_image(big)
        with pytest.raises(ImageLoadError, match="too large"):
            load_image(bomb, max_pixels=10**12)
        with pytest.raises(ImageLoadError, match="exceeds max_pixels"):
            read_image_size(big)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (limit, truncated_flag)


def test_read_image_size_reads_the_header_only(tmp_path):
    assert read_image_size(_png_header_only(tmp_path / "h.png", 300, 200)) == (300, 200)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(tmp_path / "h.png")


@pytest.mark.parametrize(
    "image_id",
    [
        "",
        "  ",
        "/etc/passwd",
        "\\\\server\\share\\x.jpg",
        "C:\\x.jpg",
        "../x.jpg",
        "a/../../x.jpg",
        "..\\x.jpg",
        ".",
    ],
)
def test_resolve_image_path_rejects_unsafe_ids(tmp_path, image_id):
    with pytest.raises(ValueError, match="image id"):
        resolve_image_path(tmp_path, image_id)


def test_resolve_image_path_joins_safe_ids_without_resolving_the_root(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert resolve_image_path(link, "123.jpg") == link / "123.jpg"
    assert resolve_image_path(link, "session1/a.jpg") == link / "session1" / "a.jpg"
    assert resolve_image_path(link, "a/../b.jpg") == link / "b.jpg"
    assert resolve_image_path("imgs", "x..y.jpg") == Path("imgs/x..y.jpg")


def test_list_images_expands_folders_recursively_and_sorted(tmp_path, caplog):
    names = [
        "b.jpg",
        "a.PNG",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "notes.txt",
        "e.gif",
        "f.avif",
        ".hidden.jpg",
    ]
    for name in [*names, "sub/readme.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="elta.data.images"):
        found = list_images([tmp_path])
    assert found == [
        tmp_path / "a.PNG",
        tmp_path / "b.jpg",
        tmp_path / "e.gif",
        tmp_path / "f.avif",
        tmp_path / "sub" / "c.webp",
        tmp_path / "sub" / "deeper" / "d.tiff",
    ]
    assert "left out 2 files that are not images (1 .txt, 1 .md)" in caplog.text


def test_gif_and_avif_photos_decode_and_heic_names_its_package(tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    for suffix in (".gif", ".avif"):
        photo.save(tmp_path / f"p{suffix}")
        assert load_image(tmp_path / f"p{suffix}").size == (60, 40)
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        (tmp_path / "p.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
        with pytest.raises(ImageLoadError, match="pip install pillow-heif"):
            load_image(tmp_path / "p.heic")


def test_list_images_reads_list_files_and_keeps_order_without_duplicates(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    for name in ["x.jpg", "y.jpg"]:
        (tmp_path / name).write_bytes(b"")
    (folder / "rel.jpg").write_bytes(b"")
    absolute = tmp_path / "y.jpg"
    (folder / "todo.txt").write_text(f"rel.jpg\n\n{absolute}\n../x.jpg\n")
    result = list_images([tmp_path / "x.jpg", str(folder / "todo.txt"), tmp_path / "x.jpg"])
    assert result == [tmp_path / "x.jpg", folder / "rel.jpg", absolute, folder / ".." / "x.jpg"]
    assert list_images(tmp_path / "x.jpg") == [tmp_path / "x.jpg"]


def test_list_images_rejects_other_paths(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        list_images([tmp_path / "data.csv"])
    with pytest.raises(ValueError, match="missing.jpg"):
        list_images([tmp_path / "missing.jpg"])
    (tmp_path / "bad.lst").write_text("ok.jpg\nreadme.md\n")
    with pytest.raises(ValueError, match="bad.lst line 2"):
        list_images([tmp_path / "bad.lst"])
