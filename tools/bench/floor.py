"""How far the codec is from the information in RAW sensor data, and what that bounds: the sync
benchmark's bytes goal (issue 6: a card to an empty peer in at most half of rsync's bytes).

    python tools/bench/floor.py [--workdir /var/tmp/vaultfs-bench] [--card 500M] [--frames 4]

For a few frames of each set that sync.py's cards are made of (sensor: the RAW-like files of
--bursts sensor, independent noise in every frame; dng: the 12 Mpx DNG frames of --bursts dng),
for the corpus's one frame of real sensor data (colorchart: Canon 550D, packed 14-bit) and for
the corpus, bytes as a ratio to the files' size:
  stored   what the store's codec makes of each file, cut as the mount cuts it (each chunk
           measured on its own: the mount's shortcut for a file's later chunks, `sure`,
           stores the same bytes on these frames)
  linear   the image data at the 0-order entropy of the residuals of a least-squares linear
           predictor from the 18 nearest samples that come before each (four to its left, seven
           in each of the two rows above), fitted per colour of the 2x2 filter pattern on the
           frame itself: a reference for what a better predictor could gain (the codec
           predicts from one sample), not a bound (least squares is not least entropy, and a
           coder can adapt, as the next line does)
  adaptive the same residuals with one distribution for each of 32 steps of light (the
           predicted value): what a coder could reach that follows the noise as it grows with
           the light (shot noise)
  noise    the image data at the entropy of the generator's own noise (dng: about, from the
           light of each photosite): a bound even for a codec that knew the scene exactly
Bytes outside the image data (headers, previews) count at what the codec stores of them. Then
the card that sync.py --card makes of the corpus and a set's frames, at each level, as a ratio
to rsync's bytes (the files' size). The frames are made or reused in the benchmarks' caches
(WORKDIR/cache, WORKDIR/compression-cache).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

import _common as C
import _dng
import compression
from field import DNG_BYTES

# Offsets (rows, samples) of the causal neighbours the linear reference predicts from.
NEIGHBOURS = [(0, -4), (0, -3), (0, -2), (0, -1)] + [
    (row, col) for row in (-2, -1) for col in range(-3, 4)]
DNG_SIZE, DNG_SEED = (4000, 3000), 7  # the burst sync.py --bursts dng makes (compression.py's)
MARGIN = 4  # rows and columns at the edges left out of the fit (their neighbours are missing)
LIGHT_STEPS = 32  # the adaptive level's steps of light
REST_CHUNK = 1 << 20  # the bytes outside image data are encoded in pieces of this size


def entropy(values: np.ndarray) -> float:
    """Bits per value of the values' own histogram (0-order)."""
    counts = np.unique(values, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def linear_bits(image: np.ndarray, every: int = 3) -> tuple[float, float]:
    """Bits per sample of the rounded residuals of the least-squares linear predictor (the
    module's docstring), over every `every`-th pair of rows (the fit on all 12 M samples would
    take GBs): with one distribution, and with one per LIGHT_STEPS step of the predicted value."""
    image = image.astype(np.float64)
    height, width = image.shape
    step = (image.max() + 1) / LIGHT_STEPS
    plain = adaptive = count = 0
    for dy in (0, 1):
        for dx in (0, 1):
            ys = np.arange(MARGIN + dy, height, 2)
            ys = ys[(ys // 2) % every == 0]
            xs = np.arange(MARGIN + dx, width - MARGIN, 2)
            y, x = np.meshgrid(ys, xs, indexing="ij")
            a = np.stack([image[y + oy, x + ox].ravel() for oy, ox in NEIGHBOURS]
                         + [np.ones(y.size)], axis=1)
            b = image[y, x].ravel()
            predicted = a @ np.linalg.lstsq(a, b, rcond=None)[0]
            residuals = np.round(b - predicted)
            plain += entropy(residuals) * b.size
            light = np.clip(predicted // step, 0, LIGHT_STEPS - 1)
            adaptive += sum(entropy(residuals[light == k]) * np.count_nonzero(light == k)
                            for k in np.unique(light))
            count += b.size
    return plain / count, adaptive / count


def stored(path: Path) -> int:
    """Bytes the store keeps of a file's chunks, the mount's cut points and layouts."""
    from vaultfs.store import codec

    return sum(len(codec.encode(c, *(layout or ()))) for c, layout in
               compression.mount_chunks(path))


def sensor_image(path: Path) -> tuple[np.ndarray, int, int]:
    """The image samples of a RAW-like file, their offset in it and their bytes there."""
    data = path.read_bytes()
    start = C.HEADER_BYTES + C.PREVIEW_BYTES
    rows = (len(data) - start) // 2 // C.WIDTH
    image = np.frombuffer(data, "<u2", rows * C.WIDTH, start).reshape(rows, C.WIDTH)
    return image, start, image.nbytes


def dng_image(path: Path) -> tuple[np.ndarray, int, int]:
    """The samples of a DNG's sensor data (its largest image: one run of strips, 16-bit
    words or packed, which LibRaw unpacks), their offset in the file and their bytes there."""
    import rawpy
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = max(tif.pages, key=lambda page: page.shape[0] * page.shape[1])
        start = min(page.dataoffsets)
        length = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts)) - start
    with rawpy.imread(str(path)) as raw:
        return raw.raw_image.copy(), start, length


def sensor_noise(path: Path) -> float:
    """Bits per sample of the RAW-like files' noise: a uniform byte through _common's table."""
    counts = np.bincount(np.frombuffer(C._NOISE, np.uint8), minlength=256)
    return entropy(np.repeat(np.arange(256), counts))


@functools.cache
def _dng_scene() -> tuple[np.ndarray, np.ndarray]:
    """The burst's scene, made once: every frame is it, its subject moved."""
    return _dng.scene(*DNG_SIZE, seed=DNG_SEED)


def dng_noise(path: Path) -> float:
    """About the bits per sample of a burst frame's noise, from the light it was made of."""
    return _dng.noise_bits(_dng.light(*_dng_scene(), int(path.stem.split("_")[1])))


def frame_levels(path: Path, image_of, noise_of) -> dict[str, float]:
    """Bytes of one frame at each level, as a ratio to its size."""
    from vaultfs.store import codec

    image, start, length = image_of(path)
    data = path.read_bytes()
    rest = data[:start] + data[start + length:]
    rest_kept = sum(len(codec.encode(rest[i:i + REST_CHUNK]))
                    for i in range(0, len(rest), REST_CHUNK))
    plain, adaptive = linear_bits(image)
    levels = {"stored": stored(path), "linear": rest_kept + plain / 8 * image.size,
              "adaptive": rest_kept + adaptive / 8 * image.size}
    if noise_of is not None:
        levels["noise"] = rest_kept + noise_of(path) / 8 * image.size
    return {k: v / len(data) for k, v in levels.items()}


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--card", default="500M", help="the card's size, as sync.py --card")
    p.add_argument("--frames", type=int, default=4, help="frames of each set measured")
    args = p.parse_args()
    work = Path(args.workdir)
    corpus = [f for f in sorted(compression.CORPUS.rglob("*")) if f.is_file()]
    corpus_size = sum(f.stat().st_size for f in corpus)
    corpus_kept = sum(stored(f) for f in corpus)
    print(f"corpus: {len(corpus)} files, {corpus_size / C.MB:.1f} MB, stored "
          f"{corpus_kept / corpus_size:.3f}")
    room = C.parse_size(args.card) - corpus_size
    sets = {
        "sensor": (C.file_set(work, args.frames * C.FILE_BYTES)[:args.frames], sensor_image,
                   sensor_noise, max(1, room // C.FILE_BYTES) if room > 0 else 0),
        "dng": (compression.file_set("burst16", work, max(args.frames, 2), *DNG_SIZE,
                                     preview=1600)[:args.frames], dng_image, dng_noise,
                max(1, room // DNG_BYTES) if room > 0 else 0),
        # The corpus's one frame of real sensor data (no card of its own).
        "colorchart": ([compression.CORPUS / "dng" / "colorchart.dng"], dng_image, None, 0),
    }
    for name, (files, image_of, noise_of, on_card) in sets.items():
        per_frame = [frame_levels(f, image_of, noise_of) for f in files]
        levels = {k: sum(f[k] for f in per_frame) / len(per_frame) for k in per_frame[0]}
        frame_size = sum(f.stat().st_size for f in files) / len(files)
        print(f"\n{name}: {len(files)} frame{'s' * (len(files) > 1)} of {frame_size / C.MB:.1f}"
              f" MB measured" + (f"; a --card {args.card} card holds {on_card} with the corpus"
                                 if on_card else ""))
        print(f"  {'level':8s} {'frame':>7s}" + f" {'card':>7s}" * bool(on_card))
        for level, ratio in levels.items():
            card = (corpus_kept + on_card * frame_size * ratio) / \
                (corpus_size + on_card * frame_size)
            print(f"  {level:8s} {ratio:7.3f}" + f" {card:7.3f}" * bool(on_card))
    print("\n(goal of issue 6 for a card: at most 0.5 of rsync's bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
