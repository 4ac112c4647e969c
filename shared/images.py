"""Reading image references safely and encoding results.

Everything a job points at is untrusted: decoding is bounded (pixel count, bytes, side),
https fetches refuse private addresses unless allowed, and every failure is an
``InputError`` whose message can be shown to the user as the job's failure reason.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import warnings
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from shared.settings import Settings


class InputError(ValueError):
    """The job's input cannot be used; permanent, never retried."""


_EXT = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def decode_image(data: bytes, settings: Settings, what: str = "image") -> Image.Image:
    """Decode to RGB with limits; refuse bombs, truncation, zero-size and non-images."""
    if not data:
        raise InputError(f"{what} is empty")
    if len(data) > settings.max_input_bytes:
        raise InputError(f"{what} is {len(data)} bytes, over the {settings.max_input_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise InputError(f"{what} has zero size")
            if w * h > settings.max_image_pixels or max(w, h) > settings.max_side:
                raise InputError(f"{what} is {w}x{h}, over the limit of {settings.max_image_pixels} pixels "
                                 f"or {settings.max_side} px a side")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not a readable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} could not be decoded: {e}") from None
    return img.convert("RGB")


def image_ext(data: bytes) -> str:
    try:
        return _EXT.get(Image.open(io.BytesIO(data)).format or "", "bin")
    except Exception:
        return "bin"


def parse_data_uri(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InputError("data URI must be data:image/<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data URI payload is not valid base64") from None


def check_public_url(url: str, settings: Settings) -> None:
    """SSRF guard: refuse loopback, private, link-local and reserved targets unless allowed."""
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise InputError(f"unsupported URL {url[:100]!r}")
    if settings.allow_private_urls:
        return
    if parsed.scheme != "https":
        raise InputError("only https:// image URLs are accepted (set EASEL_ALLOW_PRIVATE_URLS for http)")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve {parsed.hostname}: {e}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            raise InputError(f"{parsed.hostname} resolves to a non-public address ({ip}); refused")


def fetch_url(url: str, settings: Settings) -> bytes:
    import httpx

    check_public_url(url, settings)
    try:
        with httpx.stream("GET", url, timeout=30, follow_redirects=False) as r:
            if r.status_code != 200:
                raise InputError(f"GET {url[:100]} returned HTTP {r.status_code}")
            chunks, total = [], 0
            for chunk in r.iter_bytes():
                total += len(chunk)
                if total > settings.max_input_bytes:
                    raise InputError(f"{url[:100]} is over the {settings.max_input_bytes}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise InputError(f"cannot fetch {url[:100]}: {e}") from None


def encode_image(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        # compress_level 1: a few % bigger files, several times faster encode on the hot path.
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    elif fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown output format {fmt}")
    return buf.getvalue()
