"""Near-duplicates: the same photo twice, resized, recompressed, cropped a little or mirrored.

Found from the pixels, not from the backbone's features, in two steps. Chosen by measurement
(docs/audit.md): on 312 sample photos with 12 planted altered copies (4% crop, 0.7x
resize, JPEG quality 60, half of them mirrored), EfficientNet-Lite0's pooled features gave a copy
a cosine of only 0.70-0.92 to its original while two different photos reached 0.90 (a threshold
finding 8 of 12 reported 26 pairs; the mirror image's features changed nothing, the CNN is nearly
mirror-invariant already): resizing and recompression blur what the features see.

1. Candidates: perceptual hashes (imagehash) of a grey thumbnail, which that blur does not
   reach: the mean of a 256-bit DCT hash's (phash) and a 64-bit gradient hash's (dhash) Hamming
   distances, each as a share of its bits, the smaller of the distance to the other photo and to
   its mirror image. Planted copies measured 0.05-0.21; but two different cars photographed
   alike on white measured from 0.195 (2-3 of the 18-21 pairs a hash threshold alone reported).
2. Check: the two photos' 32x32 colour thumbnails, aligned by trying small crops of either one
   and the mirror image, correlated (Pearson). Copies measured 0.975-0.999, those look-alike
   cars 0.935 at most.
On three plants this found 11, 12 and 12 of the 12 copies (the one missed: a transparent PNG
copied onto black) with 16, 18 and 17 pairs in all: the rest are duplicates the Kaggle set holds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .. import config
from ..images import ImageError, open_image

# The decoded size hashes start from (JPEGs decode at a reduced DCT scale down to it): the
# hashes shrink it to 64x64 and 9x8 pixels anyway.
HASH_DECODE_SIZE = 256
PHASH_SIZE, DHASH_SIZE = 16, 8  # bits: 16x16 = 256 and 8x8 = 64
# Each bit's weight in the distance: either hash counts half, whatever its length.
BIT_WEIGHTS = np.concatenate([np.full(PHASH_SIZE**2, 0.5 / PHASH_SIZE**2), np.full(DHASH_SIZE**2, 0.5 / DHASH_SIZE**2)])
THUMBNAIL, COMPARED = 64, 32  # pixels: kept per photo, and correlated after alignment
# Crops tried for the alignment: a share of each side cut in all (up to 6%, for a 4% crop), the
# cut split 0/100, 50/50 or 100/0 between the two edges.
CROPS = [(0.0, 0.0, 0.0, 0.0)] + [(cut, cut, ox, oy) for cut in (0.02, 0.04, 0.06)
                                  for ox in (0, 0.5, 1) for oy in (0, 0.5, 1)]


@dataclass
class Fingerprint:
    bits: np.ndarray  # phash then dhash, 0/1 float32
    mirrored: np.ndarray  # the same of the mirror image
    thumbnail: Image.Image  # THUMBNAIL x THUMBNAIL RGB


def fingerprint(path: Path) -> Fingerprint | None:
    """The photo's hashes and thumbnail; None when it cannot be decoded."""
    import imagehash

    try:
        image = open_image(path, HASH_DECODE_SIZE)
    except ImageError:
        return None

    def bits(picture):
        return np.concatenate([imagehash.phash(picture, hash_size=PHASH_SIZE).hash.ravel(),
                               imagehash.dhash(picture, hash_size=DHASH_SIZE).hash.ravel()]).astype(np.float32)

    thumbnail = image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return Fingerprint(bits(image), bits(ImageOps.mirror(image)), thumbnail)


def fingerprint_all(paths: list[Path], workers: int) -> list[Fingerprint | None]:
    """fingerprint of every path, decoded in `workers` threads (PIL and scipy's DCT release the
    GIL), with a progress bar."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(fingerprint, paths), total=len(paths), desc="hashing photos", unit="img"))


def hash_distances(bits: np.ndarray, mirrored: np.ndarray, block: int = 1024) -> np.ndarray:
    """Weighted Hamming distance (0: the same hashes, ~0.5: unrelated photos) between every two
    photos, the smaller of photo-to-photo and photo-to-mirror-image: an n x n float32 matrix."""
    n = len(bits)
    distances = np.empty((n, n), dtype=np.float32)
    weighted, weighted_not = bits * BIT_WEIGHTS, (1 - bits) * BIT_WEIGHTS
    for start in range(0, n, block):  # row blocks: memory stays at a few n-long rows
        rows = slice(start, start + block)
        # For 0/1 vectors a, b: the weight of the bits where they differ = w.a.(1-b) + w.(1-a).b
        plain = weighted[rows] @ (1 - bits).T + weighted_not[rows] @ bits.T
        flipped = weighted[rows] @ (1 - mirrored).T + weighted_not[rows] @ mirrored.T
        distances[rows] = np.minimum(plain, flipped)
    return np.minimum(distances, distances.T)  # a's mirror against b is about b's mirror against a


def aligned_views(thumbnail: Image.Image) -> np.ndarray:
    """(2, len(CROPS), COMPARED**2 * 3): the thumbnail and its mirror image, under every crop,
    each as a zero-mean unit vector (a dot product of two is their Pearson correlation)."""
    views = []
    for picture in (thumbnail, ImageOps.mirror(thumbnail)):
        for cut_x, cut_y, share_x, share_y in CROPS:
            left, top = THUMBNAIL * cut_x * share_x, THUMBNAIL * cut_y * share_y
            box = (left, top, left + THUMBNAIL * (1 - cut_x), top + THUMBNAIL * (1 - cut_y))
            v = np.asarray(picture.resize((COMPARED, COMPARED), Image.Resampling.BILINEAR, box=box), np.float32).ravel()
            views.append(v - v.mean())
    views = np.stack(views)
    views /= np.linalg.norm(views, axis=1, keepdims=True) + 1e-6
    return views.reshape(2, len(CROPS), -1)


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of two photos' aligned_views: either one cropped, against the other
    whole or mirrored."""
    a_cropped_vs_b = a[0] @ b[:, 0].T  # (crops, mirror)
    a_vs_b_cropped = a[0, 0] @ b.reshape(-1, a.shape[-1]).T
    return float(max(a_cropped_vs_b.max(), a_vs_b_cropped.max()))


def near_duplicate_pairs(prints: list[Fingerprint]) -> list[tuple[int, int, float]]:
    """(i, j, similarity) of every pair i < j that is the same photo altered: hash distance
    within config.DUPLICATE_HASH_DISTANCE and aligned correlation (the similarity) at least
    config.DUPLICATE_MIN_CORRELATION; most similar first."""
    distances = hash_distances(np.stack([p.bits for p in prints]), np.stack([p.mirrored for p in prints]))
    first, second = np.nonzero(np.triu(distances <= config.DUPLICATE_HASH_DISTANCE, k=1))
    views = {i: aligned_views(prints[i].thumbnail) for i in set(first.tolist()) | set(second.tolist())}
    pairs = []
    for a, b in zip(first.tolist(), second.tolist()):
        similarity = aligned_correlation(views[a], views[b])
        if similarity >= config.DUPLICATE_MIN_CORRELATION:
            pairs.append((a, b, round(similarity, 4)))
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))
