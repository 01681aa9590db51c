"""Write data/neither/: images that are neither a car nor a bike, for measuring how many of them the
model flags as out of distribution (train.py reports it in metrics.json).

    .venv/bin/python scripts/make_neither_set.py [--out-dir data/neither]

No download: real photos and scans that installed packages ship (matplotlib's and scikit-learn's
sample images: a portrait, a temple, a flower, an MRI slice, elevation maps) and crops of them,
plus generated scenes (an empty road, a sky, a document, charts, textures). Seeded: a rerun
writes the same images. The output is committed, so training needs neither scikit-learn nor
this script.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from any directory

from vehicle_classifier import config  # noqa: E402

SIZE = 320  # longer side of each stored image: enough for a 224 crop, small in the repository


def _sample_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _figure_image(draw: Callable) -> Image.Image:
    """A matplotlib drawing rendered to an RGB image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    draw(fig)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _colormapped(values: np.ndarray, cmap: str) -> Image.Image:
    from matplotlib import colormaps

    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-9)
    return Image.fromarray((colormaps[cmap](values)[..., :3] * 255).astype(np.uint8))


def packaged_photos() -> Iterator[tuple[str, Image.Image]]:
    """Photos and scans from matplotlib and scikit-learn, with crops of the larger ones."""
    from sklearn.datasets import load_sample_images

    hopper = Image.open(_sample_data("grace_hopper.jpg")).convert("RGB")
    yield "portrait", hopper
    yield "portrait_face", hopper.crop((150, 40, 400, 290))
    yield "present", Image.open(_sample_data("Minduka_Present_Blue_Pack.png")).convert("RGB")
    yield "logo", Image.open(_sample_data("logo2.png")).convert("RGB")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    yield "temple", china
    yield "temple_roof", china.crop((100, 0, 400, 250))
    yield "temple_side", china.crop((0, 150, 250, 420))
    yield "flower", flower
    yield "flower_petals", flower.crop((250, 100, 500, 350))
    with gzip.open(_sample_data("s1045.ima.gz")) as f:
        mri = np.frombuffer(f.read(), np.uint16).astype(np.float32).reshape(256, 256)
    yield "mri_slice", _colormapped(mri, "gray")
    from matplotlib import colormaps
    from matplotlib.colors import LightSource

    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        with np.load(_sample_data(name)) as dem:
            elevation = dem["topo" if "topo" in dem else "elevation"].astype(np.float32)
        shaded = LightSource(azdeg=315, altdeg=45).shade(elevation, cmap=colormaps["gist_earth"])
        yield f"relief_{name.split('.')[0]}", Image.fromarray((shaded[..., :3] * 255).astype(np.uint8))


def generated_scenes(rng: np.random.Generator) -> Iterator[tuple[str, Image.Image]]:
    """Scenes and textures drawn here: what a camera on a road may see that is no vehicle."""
    yy, xx = np.mgrid[0:240, 0:320] / 240.0
    yield from _scenes(rng, yy)
    yield from _textures(rng, yy, xx)


def _scenes(rng: np.random.Generator, yy: np.ndarray) -> Iterator[tuple[str, Image.Image]]:
    """A road, the sky, a page of text, two charts and noise."""
    road = Image.new("RGB", (320, 240), (120, 170, 230))
    draw = ImageDraw.Draw(road)
    draw.rectangle((0, 110, 320, 240), fill=(70, 130, 60))
    draw.polygon([(150, 110), (170, 110), (300, 240), (20, 240)], fill=(90, 90, 95))
    for y in range(120, 240, 25):
        draw.rectangle((158, y, 162, y + 12), fill=(240, 240, 240))
    yield "empty_road", road.filter(ImageFilter.GaussianBlur(1))
    sky = np.stack([80 + 100 * yy, 140 + 80 * yy, 230 + 0 * yy], -1) + rng.normal(0, 4, (240, 320, 3))
    yield "sky", Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    page = Image.new("RGB", (240, 320), "white")
    draw = ImageDraw.Draw(page)
    words = "the quick brown fox jumps over a lazy dog while vehicles wait at the crossing".split()
    for line in range(22):
        draw.text((14, 12 + line * 13), " ".join(rng.choice(words, 6)), fill="black")
    yield "document", page
    yield "line_chart", _figure_image(lambda fig: fig.subplots().plot(np.cumsum(rng.normal(size=(200, 3)), 0)))
    yield "bar_chart", _figure_image(lambda fig: fig.subplots().bar(list("ABCDEFG"), rng.uniform(1, 9, 7)))
    yield "noise", Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))


def _textures(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Iterator[tuple[str, Image.Image]]:
    """A checkerboard, wood, bricks, a fractal, bokeh and plain grey."""
    squares = ((xx * 8).astype(int) + (yy * 8).astype(int)) % 2
    yield "checkerboard", Image.fromarray((squares * 255).astype(np.uint8)).convert("RGB")
    rings = np.sin(40 * np.hypot(xx - 0.3, yy - 0.2) + 3 * np.sin(7 * yy))
    yield "wood", _colormapped(rings + rng.normal(0, 0.2, rings.shape), "copper")
    bricks = Image.new("RGB", (320, 240), (180, 180, 170))
    draw = ImageDraw.Draw(bricks)
    for row in range(12):
        for col in range(-1, 9):
            x = col * 40 + (20 if row % 2 else 0)
            colour = tuple(int(v) for v in rng.integers(120, 180, 3))
            draw.rectangle((x + 2, row * 20 + 2, x + 38, row * 20 + 18), fill=colour)
    yield "brick_wall", bricks
    c = (xx * 1.6 - 1.2) * 1.3 + 1j * (yy - 0.5) * 1.6
    z, escape = np.zeros_like(c), np.zeros(c.shape)
    for i in range(40):
        z = np.where(np.abs(z) < 4, z * z + c, z)
        escape += np.abs(z) < 4
    yield "fractal", _colormapped(escape, "magma")
    blobs = Image.new("RGB", (320, 240), (20, 20, 30))
    draw = ImageDraw.Draw(blobs)
    for _ in range(40):
        x, y, r = rng.integers(0, 320), rng.integers(0, 240), rng.integers(5, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(60, 255, 3)))
    yield "bokeh", blobs.filter(ImageFilter.GaussianBlur(6))
    yield "grey", Image.new("RGB", (320, 240), (128, 128, 128))


def write_set(out_dir: Path, seed: int = 0) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in [*packaged_photos(), *generated_scenes(np.random.default_rng(seed))]:
        image = image.convert("RGB")
        image.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
        path = out_dir / f"{name}.jpg"
        image.save(path, format="JPEG", quality=88)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO / config.NEITHER_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    written = write_set(args.out_dir)
    print(f"wrote {len(written)} images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
