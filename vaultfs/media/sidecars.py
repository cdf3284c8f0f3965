"""Which file is whose sidecar, by the naming conventions of the applications that write them.

    IMG_0001.xmp                 Lightroom, Camera Raw, Capture One, Photo Mechanic -> IMG_0001.*
    IMG_0001.NEF.xmp             darktable (and digiKam)                            -> IMG_0001.NEF
    IMG_0001_01.NEF.xmp          darktable's duplicate 01                           -> IMG_0001.NEF
    IMG_0001.NEF.pp3             RawTherapee                                        -> IMG_0001.NEF
    IMG_0001.NEF.dop             DxO PhotoLab                                       -> IMG_0001.NEF
    CaptureOne/Settings*/IMG_0001.NEF.cos   Capture One                             -> IMG_0001.NEF
    IMG_0001.vrd, IMG_0001.dr4   Canon DPP                                          -> IMG_0001.*
    IMG_0001.aae                 Apple Photos                                       -> IMG_0001.*

Names compare case-insensitively (cameras write IMG_0001.CR2, editors img_0001.cr2.xmp).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SIDECAR_EXTS = {".xmp", ".pp3", ".dop", ".cos", ".vrd", ".dr4", ".aae"}
_DUPLICATE = re.compile(r"^(.*)_\d\d$")  # darktable: IMG_0001_01.NEF.xmp


def _split(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot else (name, "")


def is_sidecar(name: str) -> bool:
    return _split(name)[1] in SIDECAR_EXTS


def link(names: Iterable[str]) -> dict[str, list[str]]:
    """For the names in one folder, each image's sidecars: {image name: [sidecar names]}.
    (.cos files live two folders down: capture_one links them.)"""
    names = list(names)
    images = [n for n in names if not is_sidecar(n)]
    by_full = {n.lower(): n for n in images}
    by_stem: dict[str, list[str]] = {}
    for n in images:
        by_stem.setdefault(_split(n)[0].lower(), []).append(n)
    out: dict[str, list[str]] = {}
    for side in (n for n in names if is_sidecar(n)):
        inner = _split(side)[0]  # IMG_0001.NEF (of IMG_0001.NEF.xmp) or IMG_0001
        targets: list[str] = []
        if inner.lower() in by_full:
            targets = [by_full[inner.lower()]]
        else:
            stem, ext = _split(inner)
            dup = _DUPLICATE.match(stem)
            if ext and dup and f"{dup.group(1)}{ext}".lower() in by_full:
                targets = [by_full[f"{dup.group(1)}{ext}".lower()]]
            elif inner.lower() in by_stem:
                targets = by_stem[inner.lower()]
        for t in targets:
            out.setdefault(t, []).append(side)
    return out


CAPTURE_ONE = "captureone"      # the folder of Capture One's settings, beside the images
SETTINGS_PREFIX = "settings"    # its folders Settings<N> (one per version of its format)


def is_capture_one_settings(folder: str, subfolder: str) -> bool:
    """Whether FOLDER/SUBFOLDER is where Capture One keeps settings: CaptureOne/Settings<N>."""
    return folder.lower() == CAPTURE_ONE and subfolder.lower().startswith(SETTINGS_PREFIX)


def capture_one(images: Iterable[str], settings: Iterable[str]) -> dict[str, list[str]]:
    """For the image names of a folder and the file names in one of its CaptureOne/Settings<N>
    folders, each image's settings files: IMG_0001.CR3.cos -> IMG_0001.CR3. (Its .cot
    thumbnails and .comask masks are kept as ordinary files: Capture One makes thumbnails
    again, and masks are not read.)"""
    by_full = {n.lower(): n for n in images}
    out: dict[str, list[str]] = {}
    for name in settings:
        stem, ext = _split(name)
        if ext == ".cos" and stem.lower() in by_full:
            out.setdefault(by_full[stem.lower()], []).append(name)
    return out
