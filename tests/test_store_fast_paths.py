"""The store's fast paths: ``prepare``'s JPEG decode at DCT scale and the reader's channels-last batches.

``selfsup prepare --format jpeg`` decodes JPEG sources with libjpeg-turbo at the DCT scale PIL's
``draft`` picks and resizes with torch's antialiased bicubic; what is checked: the drafted pixels
are PIL's own (bit-identical), the prepared image matches the folder's decode and a full-size
(undrafted) decode within resampling tolerance at every EXIF orientation, gray and RGB, and files
it does not handle (PNG, CMYK) still take the folder's decode. The reader stacks decoded JPEGs as
channels-last batches: the same values as ``default_collate``, the same views out of the
augmentation, and the same batches for the same steps (exact resume).
"""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

if importlib.util.find_spec("streaming") is None or importlib.util.find_spec("simplejpeg") is None:
    pytest.skip("needs the store extra: pip install 'selfsup[store]'", allow_module_level=True)

from torch.utils.data import default_collate  # noqa: E402

from selfsup.data.folders import decode_image  # noqa: E402
from selfsup.data.prepare import _encode, _jpeg_at_load_size, _jpeg_draft_decode, prepare_store  # noqa: E402
from selfsup.data.store import StoreDataset, collate_channels_last  # noqa: E402
from selfsup.training.batches import batch_stream  # noqa: E402
from selfsup.views.augment import BatchAugment  # noqa: E402
from selfsup.views.config import ViewConfig  # noqa: E402

L = 82  # default_load_size(72)


def _photo(seed: int, w: int, h: int, gray: bool = False) -> Image.Image:
    """Smooth, asymmetric colour regions plus fine texture: a wrong flip or rotation shows, so does detail."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 4, (h, w, 1)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("L") if gray else image


def _jpeg(img: Image.Image, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def _full_decode(data: bytes, size: int, channels: int) -> np.ndarray:
    """The undrafted reference: full-size PIL decode, EXIF rotation, centre square, PIL bicubic to ``size``."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    return np.asarray(img).reshape(size, size, channels)


# (width, height) -> the DCT scale PIL's draft takes for L = 82: 1 (no scaling), 1/2, 1/4, 1/8
SIZES = {(150, 120): 1, (400, 300): 2, (700, 500): 4, (1400, 700): 8}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("gray", [False, True])
def test_draft_decode_gives_pils_drafted_pixels_at_its_scale(size, gray, tmp_path):
    data = _jpeg(_photo(sum(size), *size, gray=gray))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    for channels in (3, 1):
        pixels, orientation = _jpeg_draft_decode(data, L, channels)
        scale = SIZES[size]
        assert pixels.shape == (-(-size[1] // scale), -(-size[0] // scale), channels) and orientation == 1
        with Image.open(path) as img:
            img.draft("L" if channels == 1 else "RGB", (L, L))  # what the folder's decode does
            ref = np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(pixels.shape)
        assert np.array_equal(pixels, ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_prepared_jpeg_matches_the_folder_and_a_full_decode_at_every_orientation(orientation, tmp_path):
    for (w, h), gray in (((400, 300), False), ((300, 700), False), ((700, 500), True), ((150, 120), False)):
        data = _jpeg(_photo(w + orientation, w, h, gray=gray), orientation)
        path = tmp_path / f"{w}x{h}.jpg"
        path.write_bytes(data)
        for channels in (3, 1):
            fast = _jpeg_at_load_size(data, L, channels)
            assert fast is not None and fast.shape == (L, L, channels) and fast.dtype == np.uint8
            folder = decode_image(path, L, channels).permute(1, 2, 0).numpy()
            full = _full_decode(data, L, channels)
            # A wrong orientation or scale gives tens of levels; resampling (whole-pixel crop, DCT scale) < 2.
            assert np.abs(fast.astype(int) - folder.astype(int)).mean() < 2.0, (w, h, channels)
            assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.5, (w, h, channels)


def test_files_the_fast_path_refuses_take_the_folders_decode(tmp_path):
    img = _photo(7, 200, 160)
    png = tmp_path / "a.png"
    img.save(png)
    cmyk = tmp_path / "c.jpg"
    img.convert("CMYK").save(cmyk, quality=95)
    for path in (png, cmyk):
        assert _jpeg_at_load_size(path.read_bytes(), L, 3) is None
        data, problem = _encode((str(path), L, 3, "jpeg", 95))
        assert problem is None
        import simplejpeg

        got = simplejpeg.decode_jpeg(data).astype(int)
        ref = decode_image(path, L, 3).permute(1, 2, 0).numpy().astype(int)
        assert got.shape == ref.shape and np.abs(got - ref).mean() < 2.0
    broken = tmp_path / "b.jpg"
    broken.write_bytes(_jpeg(img)[:300])
    assert _jpeg_at_load_size(broken.read_bytes(), L, 3) is None
    assert _encode((str(broken), L, 3, "jpeg", 90))[0] is None  # the folder's decode names the problem


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast")
    folder = root / "photos"
    folder.mkdir()
    for i in range(24):
        (folder / f"img{i:03d}.jpg").write_bytes(_jpeg(_photo(i, 120 + 13 * i, 100 + 7 * (i % 5)), 1 + i % 8))
    prepare_store(f"imagefolder:{folder}", root / "store", size=72, workers=2, part_size=10, progress=False)
    return root / "store"


def test_a_prepared_jpeg_store_matches_its_folder(jpeg_store):
    manifest = json.loads((jpeg_store / "manifest.json").read_text())
    folder = Path(manifest["source"].split(":", 1)[1])
    store = StoreDataset(jpeg_store)
    for i in range(len(store)):
        ref = decode_image(folder / store.name_of(i), L, 3)
        # Quality-90 re-encoding of these textured 82-px images costs 1.9-2.4 levels by itself; the whole-pixel
        # crop up to 0.7 more where the folder's box starts half a pixel in. A wrong orientation costs tens.
        assert store[i][0].shape == ref.shape and (store[i][0].float() - ref.float()).abs().mean() < 3.5, i


def test_channels_last_collate_gives_default_collates_values_and_views(jpeg_store):
    store = StoreDataset(jpeg_store)
    items = [store[i] for i in range(8)]
    images, labels = collate_channels_last(items)
    ref_images, ref_labels = default_collate(items)
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    aug = BatchAugment(ViewConfig.simclr(64), 64, store.mean, store.std)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(ref_images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # the views do not depend on the batch's memory layout
    contiguous = [(x.contiguous(), y) for x, y in items]  # a raw store's pixels: default_collate as before
    out, _ = collate_channels_last(contiguous)
    assert out.is_contiguous() and torch.equal(out, ref_images)


def test_store_batches_from_workers_are_the_items_and_resume_exactly(jpeg_store):
    store = StoreDataset(jpeg_store)
    whole = list(batch_stream(store, 8, 5, 0, 6, 2, torch.device("cpu")))
    resumed = list(batch_stream(store, 8, 5, 3, 6, 1, torch.device("cpu")))
    assert len(whole) == 6 and len(resumed) == 3
    for a, b in zip(whole[3:], resumed):
        assert torch.equal(a, b)
    from selfsup.training.batches import step_indices

    for step, batch in enumerate(whole):
        idx = step_indices(len(store), 8, 5, step)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch, torch.stack([store[int(i)][0] for i in idx]))
