"""Every stored form of a chunk decodes to exactly its bytes (property tests over random bytes
and random sample arrays, every codec and predictor layout), damage is always caught, and the
measured choice picks the predictor for sensor data and not for already-compressed data."""

from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CORPUS
from vaultfs.chunking import split, structure
from vaultfs.store import format as F
from vaultfs.store.codec import (ChunkCorrupt, Layout, decode, encode, predicted, stored_layout,
                                  xxh3)

LAYOUTS = st.builds(
    Layout,
    bits=st.sampled_from([8, 10, 12, 14, 16]),
    # (short periods and strides often: the chunks here are short, and the decoder sums
    # strides under 16 one chain at a time, longer ones a vector at a time)
    period=st.one_of(st.integers(1, 8), st.integers(1, 255)),
    stride=st.one_of(st.just(0), st.integers(1, 40), st.integers(1, 5000)),
).flatmap(lambda lay: st.sampled_from(
    [lay, Layout(16, True, lay.period, lay.stride)] if lay.bits == 16 else [lay]))


# ---- docs/store-format.md §4.3.1, as written there, a sample at a time ------------------------
def spec_pack(layout: Layout, samples) -> bytes:
    """The body holding `samples` (a whole number of groups)."""
    if layout.bits == 8:
        return bytes(int(s) for s in samples)
    if layout.bits == 16:
        return b"".join(int(s).to_bytes(2, "big" if layout.big_endian else "little")
                        for s in samples)
    g, s, b = layout.group_bytes, layout.group_samples, layout.bits
    return b"".join(sum(int(samples[i + k]) << (8 * g - b * (k + 1)) for k in range(s))
                    .to_bytes(g, "big") for i in range(0, len(samples), s))


def spec_unpack(layout: Layout, body: bytes) -> list[int]:
    if layout.bits == 8:
        return list(body)
    if layout.bits == 16:
        order = "big" if layout.big_endian else "little"
        return [int.from_bytes(body[i:i + 2], order) for i in range(0, len(body), 2)]
    g, s, b = layout.group_bytes, layout.group_samples, layout.bits
    groups = [int.from_bytes(body[i:i + g], "big") for i in range(0, len(body), g)]
    return [v >> (8 * g - b * (k + 1)) & ((1 << b) - 1) for v in groups for k in range(s)]


def spec_content(data: bytes, layout: Layout, lead: int) -> bytes:
    """The content of the zstd frame of `data`'s samples form: lead, tail, planes."""
    g = layout.group_bytes
    body_len = (len(data) - lead) // g * g
    x = spec_unpack(layout, data[lead:lead + body_len])
    count, w = len(x), 1 if layout.bits == 8 else 2
    m, h = 1 << 8 * w, len(x) if layout.stride == 0 else min(layout.stride, len(x))
    z = []
    for i in range(count):
        if i < h:
            p = x[i - layout.period] if i >= layout.period else 0
        else:
            p = x[i - layout.stride]
        s = (x[i] - p) % m
        s = s - m if s >= m // 2 else s
        z.append(2 * s if s >= 0 else -2 * s - 1)
    top = [v >> 8 if w == 2 else v for v in z] + [0] * (-count % 8)
    planes = b"".join(bytes(sum((top[8 * grp + k] >> j & 1) << k for k in range(8))
                            for grp in range(len(top) // 8)) for j in range(8))
    low = bytes(v & 0xFF for v in z) if w == 2 else b""
    return data[:lead] + data[lead + body_len:] + low + planes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), layout=LAYOUTS, lead=st.integers(0, 6))
def test_the_samples_form_is_the_one_the_format_document_describes(data, layout, lead):
    """What another program reading docs/store-format.md would expect, byte for byte, and
    the header that says how to read it."""
    lead = min(lead % layout.group_bytes, len(data))
    stored = predicted(data, layout, lead)
    bits, flags, period, got_lead, stride, count = struct.unpack_from(">BBBBII", stored, 1)
    assert (bits, flags, period, got_lead, stride) == (
        layout.bits, int(layout.big_endian), layout.period, lead, layout.stride)
    assert count == (len(data) - lead) // layout.group_bytes * layout.group_samples
    content = zstandard.ZstdDecompressor().decompress(stored[13:])
    assert content == spec_content(data, layout, lead)


def roundtrip(data: bytes, stored: bytes) -> None:
    assert decode(xxh3(data), stored, len(data)) == data
    # The record's stored length is the value's length less the codec byte; nothing else is
    # needed to decode it.
    assert decode(xxh3(data), memoryview(stored), None) == data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), layout=LAYOUTS, lead=st.integers(0, 6),
       offset=st.integers(0, 100))
def test_every_form_of_random_bytes_decodes_exactly(data, layout, lead, offset):
    lead = min(lead % layout.group_bytes, len(data))
    roundtrip(data, predicted(data, layout, lead))
    roundtrip(data, encode(data, layout, offset))
    roundtrip(data, encode(data))
    roundtrip(data, bytes((F.CODEC_RAW,)) + data)


@st.composite
def sensor_bytes(draw) -> tuple[bytes, int, int]:
    """A run of 16-bit (or packed) samples, sliced at an odd offset to an odd length, like a
    chunk cut by content out of the middle of a RAW's image data."""
    n = draw(st.integers(1, 100_000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["noise", "smooth", "extreme"]))
    if kind == "noise":
        x = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    elif kind == "smooth":
        x = np.clip(3000 + np.cumsum(rng.normal(0, 40, n)) + rng.normal(0, 20, n), 0, 16383)
    else:  # the extremes, where wrapping residuals and zigzag must hold
        x = rng.choice(np.array([0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]), n)
    raw = np.asarray(x, np.uint16).astype("<u2").tobytes()
    start = draw(st.integers(0, min(7, len(raw) - 1)))
    end = draw(st.integers(start + 1, len(raw)))
    return raw[start:end], start, seed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=sensor_bytes(), layout=LAYOUTS)
def test_every_form_of_sample_arrays_decodes_exactly(sample, layout):
    data, start, _ = sample
    roundtrip(data, encode(data, layout, start))
    roundtrip(data, encode(data))
    roundtrip(data, predicted(data, layout, min(start % layout.group_bytes, len(data))))


def test_large_chunks_of_every_layout_decode_exactly():
    """Chunks above the size where the choice is measured on windows, at every byte phase."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:600, 0:1100]
    scene = 3000 + 2000 * np.sin(x / 90) * np.cos(y / 70)
    for layout in (Layout(16, False, 2, 2200), Layout(16, True, 2, 2200), Layout(14, False, 2),
                   Layout(12, False, 2, 2200), Layout(10, False, 1, 1100),
                   Layout(8, False, 3, 3300)):
        top = (1 << layout.bits) - 1
        noise = rng.normal(0, max(1, 8 * top / 16383), scene.shape)
        samples = np.clip(scene * top / 8000 + noise, 0, top).astype(np.uint16).reshape(-1)
        raw = spec_pack(layout, samples[:len(samples) // layout.group_samples
                                        * layout.group_samples])
        for phase in range(layout.group_bytes + 1):
            data = raw[phase:phase + 700_001]
            stored = encode(data, layout, phase)
            assert stored[0] == F.CODEC_SAMPLES, layout
            roundtrip(data, stored)


@settings(max_examples=300, deadline=None)
@given(sample=sensor_bytes(), where=st.integers(0, 1 << 30), flip=st.integers(1, 255))
def test_damage_to_a_predictor_chunk_is_always_caught(sample, where, flip):
    data, start, _ = sample
    stored = bytearray(predicted(data, Layout(16, False, 2, 64), start % 2))
    stored[where % len(stored)] ^= flip
    try:
        out = decode(xxh3(data), bytes(stored), len(data))
    except ChunkCorrupt:
        return
    assert out == data  # (a flip the decoder ignores, e.g. in a zstd frame's padding)


def test_a_truncated_or_unknown_stored_value_is_damaged():
    data = bytes(range(256)) * 40
    stored = predicted(data, Layout(16))
    for bad in (stored[:5], stored[:-3], b"", bytes((3,)) + data):
        with pytest.raises(ChunkCorrupt):
            decode(xxh3(data), bad, len(data))
    # A zstd frame that says it holds 200 MB (a peer's bomb) is refused unopened.
    bomb = bytes((1,)) + zstandard.ZstdCompressor().compress(bytes(200_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(ChunkCorrupt):
            decode(xxh3(data), bomb, len(data))
        assert tracemalloc.get_traced_memory()[1] < 10_000_000
    finally:
        tracemalloc.stop()


def noisy_bayer(width: int = 2000, height: int = 300, seed: int = 1) -> np.ndarray:
    """14-bit Bayer samples with shot and read noise on a smooth scene."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    electrons = 3 * (2000 + 5000 * (0.5 + 0.5 * np.sin(x / 300) * np.cos(y / 200)))
    gain = np.where((y % 2 == 0) & (x % 2 == 0), 0.5, np.where((y + x) % 2, 1.0, 0.7))
    dn = rng.poisson(electrons * gain) / 3 + rng.normal(0, 2.5, x.shape) + 512
    return np.clip(np.round(dn), 0, 16383).astype(np.uint16)


def test_sensor_data_takes_the_predictor_and_beats_zstd_clearly():
    raw = noisy_bayer().astype("<u2").tobytes()
    zstd_alone = len(zstandard.ZstdCompressor(level=1).compress(raw))
    for layout, offset in ((Layout(16, False, 2, 4000), 1), (None, 0), (None, 1)):
        stored = encode(raw[offset:], layout, offset)
        assert stored[0] == F.CODEC_SAMPLES
        assert len(stored) < 0.7 * zstd_alone, (layout, len(stored) / zstd_alone)
        roundtrip(raw[offset:], stored)
    packed = Layout(14, False, 2, 4000)
    data = spec_pack(packed, noisy_bayer().reshape(-1))
    stored = encode(data, packed)
    assert stored[0] == F.CODEC_SAMPLES
    assert len(stored) < 0.75 * len(zstandard.ZstdCompressor(level=1).compress(data))


def test_a_layout_taken_as_sure_stores_what_measuring_would():
    """The mount measures the first chunks of a run of image data, then takes the layout that
    won as sure for the rest (fs/ingest.py): the stored bytes are those measuring gives; and
    where the predictor saves nothing, the sure path measures after all."""
    layout = Layout(16, False, 2, 4000)
    raw = noisy_bayer(height=1000).astype("<u2").tobytes()
    packed = Layout(14, False, 2, 4000)
    data = spec_pack(packed, noisy_bayer(height=1000).reshape(-1))
    for lay, content in ((layout, raw), (packed, data)):
        won = stored_layout(encode(content[:1 << 20], lay))[0]
        # Chunks of odd lengths at odd places: leads that are not 0 for the packed samples.
        for off in range(1_000_003, len(content) - 999_999, 999_999):
            chunk = content[off:off + 999_999]
            assert encode(chunk, won, off, sure=True) == encode(chunk, lay, off), (lay, off)
    noise = random.Random(5).randbytes(1 << 20)
    assert encode(noise, layout, sure=True)[0] == F.CODEC_RAW


def test_compressed_image_data_is_not_run_through_the_predictor():
    """JPEG scans and HEVC tiles (the corpus's own) are stored raw or as zstd, never through
    the predictor; text is zstd."""
    seen = 0
    for path in sorted((CORPUS / "jpeg" / "large").glob("*.jpg")) + \
            sorted((CORPUS / "heic").glob("*.heic")):
        data = path.read_bytes()
        cuts = [c for c in structure(lambda o, n: data[o:o + n], len(data)).cuts
                if c < len(data)]
        scan = data[cuts[-1]:] if path.suffix == ".jpg" else data[max(
            zip(cuts, cuts[1:] + [len(data)]), key=lambda c: c[1] - c[0])[0]:]
        for off, n in split(scan):
            stored = encode(scan[off:off + n])
            assert stored[0] in (F.CODEC_RAW, F.CODEC_ZSTD), path.name
            assert len(stored) > 0.95 * n
            seen += 1
    assert seen > 30
    text = "\n".join(f"{i},{random.Random(i).random():.6f},ok" for i in range(50_000)).encode()
    assert encode(text)[0] == F.CODEC_ZSTD


@pytest.mark.parametrize("order,swap", [("<", False), (">", False), (">", True)])
def test_words_under_a_bits_per_sample_of_14_are_read_as_words(tmp_path, order, swap):
    """Uncompressed NEF and ARW say 14 in BitsPerSample and hold 16-bit words, some of them in
    the byte order opposite to the file's: the size of the strips tells words from packed
    samples, and the measuring finds the byte order."""
    import tifffile

    samples = noisy_bayer(1200, 400)
    path = tmp_path / "DSC_0001.NEF"
    tifffile.imwrite(path, samples.byteswap() if swap else samples, photometric=32803,
                     bitspersample=16, byteorder=order, extratags=[(33421, "H", 2, (2, 2), True)])
    with tifffile.TiffFile(path) as tif:
        at = tif.pages[0].tags["BitsPerSample"].valueoffset
    raw = bytearray(path.read_bytes())
    raw[at:at + 2] = (14).to_bytes(2, "little" if order == "<" else "big")
    data = bytes(raw)
    [image] = structure(lambda o, n: data[o:o + n], len(data)).images
    assert image.layout == Layout(16, order == ">", 2, 2400)
    chunk = data[image.start + 1001:image.start + 601_001]
    stored = encode(chunk, image.layout, 1001)
    assert stored[0] == F.CODEC_SAMPLES
    assert len(stored) < 0.7 * len(zstandard.ZstdCompressor(level=1).compress(chunk))
    roundtrip(chunk, stored)
