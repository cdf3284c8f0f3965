"""Uncompressed DNG files of a simulated Bayer sensor, for the compression benchmark and tests.

A frame is a scene (smooth light, textured and sharp-edged objects, one of them moving a few
pixels between frames) seen through an RGGB colour filter array by a 14-bit sensor: photon shot
noise (Poisson, at the sensor's gain in electrons per count), read noise (Gaussian), a black
level, clipping at white, stored as 16-bit words (what uncompressed DNGs from most cameras
hold). The files carry the DNG tags a raw converter needs (version, CFA pattern, black and
white levels, colour matrix, as-shot neutral), written by tifffile; rawpy (LibRaw) and exiftool
read them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile

BITS = 14
BLACK = 512
WHITE = (1 << BITS) - 1
GAIN = 3.0          # electrons per count at base ISO: a ~50,000 e- full well over 14 bits
READ_NOISE = 3.0    # electrons
# Relative sensitivity of the R, G, B photosites under daylight, and the RGGB pattern.
CHANNEL_GAIN = {0: 0.48, 1: 1.0, 2: 0.62}
PATTERN = ((0, 1), (1, 2))


def scene(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The light (electrons per photosite, before the colour filter) of a still background,
    and of one moving object: a textured disc that each frame shifts a little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.35 + 0.25 * np.sin(x / width * 2.1 + 0.4) * np.cos(y / height * 1.7)
    for _ in range(12):  # objects with edges and texture: boxes of varied reflectance
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 20, width // 4), rng.integers(height // 20, height // 4)
        box = (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)
        freq = rng.uniform(0.02, 0.3)
        light[box] = rng.uniform(0.05, 0.9) * (1 + 0.15 * np.sin(freq * x[box] + freq * y[box]))
    light += 0.03 * np.sin(x / 3.7) * np.sin(y / 5.3)  # fine detail everywhere
    full = 0.75 * GAIN * (WHITE - BLACK)
    disc = (0.6 + 0.3 * np.sin(x / 7.0) * np.cos(y / 9.0)).astype(np.float32)
    return np.clip(light, 0.01, 1.2) * full, disc * full


def light(still: np.ndarray, disc: np.ndarray, index: int) -> np.ndarray:
    """The electrons each photosite of frame `index` of a burst expects: the disc a few pixels
    further along, seen through the colour filters."""
    height, width = still.shape
    y, x = np.mgrid[0:height, 0:width]
    cx, cy, r = width * (0.3 + 0.004 * index), height * 0.5 + 2 * index, min(width, height) / 6
    electrons = np.where((x - cx) ** 2 + (y - cy) ** 2 < r * r, disc, still)
    cfa = np.empty_like(electrons)
    for dy in (0, 1):
        for dx in (0, 1):
            cfa[dy::2, dx::2] = electrons[dy::2, dx::2] * CHANNEL_GAIN[PATTERN[dy][dx]]
    return cfa


def frame(still: np.ndarray, disc: np.ndarray, index: int, seed: int) -> np.ndarray:
    """Frame `index` of a burst: its light with fresh noise, as the sensor counts it."""
    cfa = light(still, disc, index)
    rng = np.random.default_rng(seed * 1000 + index)
    signal = rng.poisson(cfa) + rng.normal(0, READ_NOISE, cfa.shape)
    return np.clip(np.round(signal / GAIN) + BLACK, 0, WHITE).astype(np.uint16)


def noise_bits(cfa: np.ndarray) -> float:
    """About the bits per sample of a frame's noise, given its light: the entropy of each
    photosite's count (shot and read noise, Gaussian at the variance of their sum, in counts;
    none for a photosite clipped at white), averaged."""
    sigma = np.sqrt(cfa + READ_NOISE ** 2) / GAIN
    bits = np.log2(sigma * np.sqrt(2 * np.pi * np.e))
    return float(np.where(cfa / GAIN + BLACK < WHITE, np.maximum(bits, 0), 0).mean())


def write(path: Path, samples: np.ndarray, model: str = "vaultfs SimCam", bits: int = 16,
          preview: int = 0) -> None:
    """One uncompressed little-endian DNG, one strip per 16 rows: samples in 16-bit words, or
    with `bits` 14 packed without gaps (the DNG packing, most significant bit first; tifffile
    needs imagecodecs for it). With `preview`, a JPEG preview that long a side in a SubIFD,
    as cameras and converters embed one (also needs imagecodecs)."""
    height, width = samples.shape
    tags = [
        (50706, "B", 4, (1, 4, 0, 0), True),            # DNGVersion
        (50707, "B", 4, (1, 1, 0, 0), True),            # DNGBackwardVersion
        (50708, "s", 0, model, True),                   # UniqueCameraModel
        (271, "s", 0, "vaultfs", True),                 # Make
        (272, "s", 0, model, True),                     # Model
        (33421, "H", 2, (2, 2), True),                  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),            # CFAPattern: RGGB
        (50710, "B", 3, (0, 1, 2), True),               # CFAPlaneColor
        (50711, "H", 1, 1, True),                       # CFALayout: rectangular
        (50714, "H", 1, BLACK, True),                   # BlackLevel
        (50717, "H", 1, WHITE, True),                   # WhiteLevel
        (50721, "2i", 9, _rational((1.0, -0.3, -0.1, -0.4, 1.2, 0.1, -0.05, 0.15, 0.6)),
         True),                                         # ColorMatrix1
        (50778, "H", 1, 21, True),                      # CalibrationIlluminant1: D65
        (50728, "2I", 3, _rational((0.48, 1.0, 0.62)), True),  # AsShotNeutral
    ]
    with tifffile.TiffWriter(path, byteorder="<") as tif:
        tif.write(samples, photometric=32803, bitspersample=bits, rowsperstrip=16,
                  subfiletype=0, extratags=tags, metadata=None, subifds=1 if preview else 0)
        if preview:
            jpeg, (width, height) = _preview(samples, preview)
            tif.write(iter([jpeg]), shape=(height, width, 3), dtype="uint8", photometric="ycbcr",
                      compression="jpeg", subsampling=(2, 2), rowsperstrip=height,
                      subfiletype=1, metadata=None)


def _preview(samples: np.ndarray, long_side: int) -> tuple[bytes, tuple[int, int]]:
    """A JPEG of the frame, `long_side` pixels on its long side: each RGGB quad as one pixel
    (the two greens averaged), black to white with a 2.2 gamma, then reduced."""
    from PIL import Image

    s = (samples.astype(np.float32) - BLACK) / (WHITE - BLACK)
    rgb = np.stack([s[0::2, 0::2], (s[0::2, 1::2] + s[1::2, 0::2]) / 2, s[1::2, 1::2]], axis=2)
    rgb = np.clip(rgb / np.array([CHANNEL_GAIN[c] for c in (0, 1, 2)]), 0, 1) ** (1 / 2.2)
    img = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue(), img.size


def _rational(values: tuple[float, ...]) -> tuple[int, ...]:
    """(numerator, denominator) pairs, flattened, as tifffile takes RATIONAL values."""
    return tuple(v for f in values for v in (round(f * 10000), 10000))
