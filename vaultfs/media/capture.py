"""What an on-capture policy (vault.toml [[capture]]) makes of a new file, as pure functions:
the XMP sidecar that carries its copyright, creator, keywords and session name (the captured
file's own bytes are never changed), and the path a rename template gives it."""

from __future__ import annotations

import posixpath
import re
import time

import pyexiv2

from ..store.policy import CapturePolicy

# Exiv2 writes a sidecar from an empty packet: the fields are then added by their XMP types.
EMPTY_XMP = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
             b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
             b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
             b'<?xpacket end="w"?>')


def applies(policy: CapturePolicy, path: str, tier: str) -> bool:
    """Whether a file captured at `path` (in `tier`) falls under the policy."""
    if policy.tier is not None:
        return policy.tier == tier
    return not policy.folder or path.startswith(policy.folder + "/")


def sidecar_path(path: str) -> str:
    """Where an image's sidecar goes: IMG_0001.CR2 -> IMG_0001.xmp, the name Lightroom, Camera
    Raw, Bridge and Capture One look for (media/sidecars.py links it to its image)."""
    return posixpath.splitext(path)[0] + ".xmp"


def sidecar(metadata: dict) -> bytes:
    """An XMP sidecar holding the policy's metadata: dc:rights, dc:creator, dc:subject and
    photoshop:TransmissionReference (IPTC Core's Job Identifier) for the session name."""
    fields: dict = {}
    if "copyright" in metadata:
        fields["Xmp.dc.rights"] = {'lang="x-default"': metadata["copyright"]}
    if "creator" in metadata:
        fields["Xmp.dc.creator"] = [metadata["creator"]]
    if metadata.get("keywords"):
        fields["Xmp.dc.subject"] = list(metadata["keywords"])
    if "session" in metadata:
        fields["Xmp.photoshop.TransmissionReference"] = metadata["session"]
    with pyexiv2.ImageData(EMPTY_XMP) as img:
        img.modify_xmp(fields)
        return img.get_bytes()


def _captured(meta: dict, mtime_ns: int) -> str:
    """When the image was taken, to the second where known ('2026-11-24T09:15:12'): its
    capture time (or the date, where that is all it gives), else the file's time."""
    known = re.match(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?",
                     str(meta.get("capture_time", "")))
    return known.group(0) if known else \
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))


def rename_fields(path: str, meta: dict, mtime_ns: int) -> dict[str, str]:
    """The values of a rename template's fields but {seq}: {date} the capture date (else the
    file's), {camera} its model, {name} and {ext} its own name's parts."""
    name, ext = posixpath.splitext(posixpath.basename(path))
    camera = re.sub(r"[^\w.+-]+", "-", str(meta.get("model") or "unknown")).strip("-")
    return {"date": _captured(meta, mtime_ns)[:10], "camera": camera or "unknown",
            "name": name, "ext": ext}


def shot(path: str, meta: dict, mtime_ns: int) -> tuple[str, str, str]:
    """What the files of one shot share (a RAW and its JPEG): their folder, their name but the
    extension (in lower case), and the second they were taken in."""
    folder, name = posixpath.split(path)
    return folder, posixpath.splitext(name)[0].lower(), _captured(meta, mtime_ns)


def renamed(template: str, path: str, fields: dict[str, str], seq: int) -> str:
    """The file's new path: the template filled in, from the file's folder."""
    return posixpath.join(posixpath.dirname(path),
                          _fill(template, {**fields, "seq": f"{seq:04d}"}))


def numbers(template: str, path: str, fields: dict[str, str], names: list[str]) -> set[int]:
    """The numbers ({seq}) that `names` (of the folder the template puts the file in) have
    taken: a name the template gives with any extension, or none, takes its number
    (D90_0001.NEF and D90_0001.xmp take 1, for D90_0001.JPG too)."""
    name = _fill(template, {**fields, "ext": "\0", "seq": "\1"}).rpartition("/")[2]
    pattern = re.compile("".join(
        r"(\d{4}|[1-9]\d{4,})" if part == "\1" else r"(?:\.[^/]*)?" if part == "\0" else re.escape(part)
        for part in re.split("([\0\1])", name)), re.IGNORECASE)
    out = set()
    for n in names:
        m = pattern.fullmatch(n)
        if m is not None and m.groups():
            out.add(int(m.group(1)))
    return out


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value.replace("/", "-"))
    return template
