"""Reading image references safely and encoding results.

Everything a job points at is untrusted: decoding is bounded (pixel count, bytes, side),
https fetches refuse private addresses unless allowed, and every failure is an
``InputError`` whose message can be shown to the user as the job's failure reason, but a
server that cannot answer for now (``SourceUnavailable``), which is retried.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import ssl
import threading
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Awaitable, Callable, Iterator, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from easel.shared.settings import Settings

T = TypeVar("T")


class InputError(ValueError):
    """The job's input cannot be used; permanent, never retried."""


class SourceUnavailable(Exception):
    """An image URL's server could not answer now (HTTP 5xx or 429, a refused or dropped
    connection): a CDN blip, not a bad input, so the job is retried like any outage."""


class Unresolved(InputError):
    """A URL's host name did not resolve now. Permanent for a job's input; a webhook
    delivery retries it, since the receiver's name may resolve again later."""


_EXT = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# Only these decoders ever see untrusted bytes: no EPS (Ghostscript), no exotic plugins.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # MPO (camera JPEGs) opens through JPEG
MIN_SIDE = 8  # smaller than one latent pixel: diffusers would resize it to 0x0


DECODES_AT_ONCE = 4  # images of the largest size a process decodes at the same time


class PixelBudget:
    """Pixels being decoded at once in this process. A decode's memory goes with its pixels
    (about 9 bytes each, for the decoded, turned and RGB copies), not its file's bytes: a
    58 KB PNG of one colour decodes to 4096x4096. The API decodes each upload and inline
    image on one of its many threads, so without a bound a burst of small files is
    gigabytes."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self._free = pixels
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


_budgets: dict[int, PixelBudget] = {}
_budgets_lock = threading.Lock()


def decode_budget(settings: Settings) -> PixelBudget:
    """The process's budget for ``settings``' largest image (one per size limit in use)."""
    with _budgets_lock:
        return _budgets.setdefault(settings.max_image_pixels,
                                   PixelBudget(DECODES_AT_ONCE * settings.max_image_pixels))


def decode_image(data: bytes, settings: Settings, what: str = "image") -> Image.Image:
    """Decode to RGB with limits; refuse bombs, truncation, zero-size and non-images.

    The size is checked from the header before any pixel is decoded, so a decompression
    bomb costs its compressed bytes, never its decoded size. Every refusal is an InputError
    whose message starts with ``what``.
    """
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    if len(data) > settings.max_input_bytes:
        raise InputError(f"{what} is {len(data)} bytes, over the {settings.max_input_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise InputError(f"{what} has zero size ({w}x{h})")
            if w * h > settings.max_image_pixels or max(w, h) > settings.max_side:
                raise InputError(f"{what} is {w}x{h}, over the limit of {settings.max_image_pixels} pixels "
                                 f"or {settings.max_side} px a side")
            if min(w, h) < MIN_SIDE:
                raise InputError(f"{what} is {w}x{h}, under the minimum of {MIN_SIDE} px a side")
            with decode_budget(settings).hold(w * h):
                img.load()
                out = to_rgb(_upright(img))
            # Pixels only: Pillow keeps text chunks (up to 64 MB an image, compressed a
            # thousandfold in the file), EXIF and ICC in ``info`` through every copy, and a
            # worker caches decoded inputs by their pixels' size.
            out.info = {}
            return out
    except InputError:
        raise
    except MemoryError:
        raise  # within the limits: the machine, not the input, is the problem
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not a readable image (supported: {', '.join(sorted(set(_EXT.values())))})") from None
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, EOFError, struct.error...
        raise InputError(f"{what} could not be decoded ({type(e).__name__}: {str(e)[:200]})") from None


def decode_own(data: bytes) -> Image.Image:
    """Decode a PNG easel wrote itself (an image hand-off between a chain's segments): not
    held to the limits of untrusted input, which an upscaled intermediate may exceed."""
    img = Image.open(io.BytesIO(data), formats=("PNG",))
    img.load()
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen (phones store portraits sideways, with an EXIF
    orientation tag), as diffusers' ``load_image`` turns it; one whose EXIF block is broken
    stays as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's "corrupt EXIF data"
            return ImageOps.exif_transpose(img)
    except Exception:
        return img


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grey: PNG and TIFF depth maps


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as diffusers' ``load_image`` makes it (alpha dropped), except that 16-bit grey is
    scaled to 8 bits: a plain conversion clips every value over 255 to white, so a depth map
    would arrive blank."""
    if img.mode in _WIDE_GREY:
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def image_ext(data: bytes) -> str:
    try:
        return _EXT.get(Image.open(io.BytesIO(data), formats=FORMATS).format or "", "bin")
    except Exception:
        return "bin"


def parse_data_uri(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InputError("data URI must be data:image/<type>;base64,<payload>")
    try:  # line breaks and spaces allowed: `base64` wraps its output at 76 columns
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data URI payload is not valid base64") from None


# IPv6 prefixes that carry an IPv4 address in their last 32 bits: NAT64's well-known prefix
# and the deprecated IPv4-compatible addresses. NAT64's local-use prefix is refused outright.
_IPV4_IN_LOW_BITS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through a translator or tunnel (mapped, 6to4,
    NAT64), which is what the SSRF check must judge."""
    if tunnelled := ip.ipv4_mapped or ip.sixtofour:
        return tunnelled
    if any(ip in net for net in _IPV4_IN_LOW_BITS) and int(ip) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL or ip.teredo:  # a tunnel to wherever its client is: no webhook or image lives there
            return True
        ip = _embedded_ipv4(ip) or ip
    # not is_global: private, loopback, link-local (cloud metadata), CGNAT 100.64/10, 0/8...
    return (not ip.is_global or ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_unspecified
            or ip.is_reserved)


def shown_url(url: str) -> str:
    """A URL as errors and logs quote it: scheme, host and path (at most 100 characters),
    without user info, query or fragment, where signed URLs carry their credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname and parts.hostname + (f":{parts.port}" if parts.port else "")
    except ValueError:  # not a URL these helpers could read: it is refused as such
        return url[:100]
    if not parts.scheme or not host:
        return url[:100]
    tail = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}"[:100] + tail


def check_public_url(url: str, settings: Settings, what: str = "image") -> str | None:
    """SSRF guard: refuse loopback, private, link-local and reserved targets unless allowed.
    ``what`` the URL is for, as its refusal names it (an image, a webhook).

    Returns the vetted IP address the request must go to (None when private URLs are
    allowed), so that a second DNS answer (rebinding) cannot redirect the download.
    """
    import httpx

    try:
        u = httpx.URL(url)
    except Exception:
        raise InputError(f"unsupported URL {shown_url(url)!r}") from None
    if u.scheme not in ("https", "http") or not u.host:
        raise InputError(f"unsupported URL {shown_url(url)!r}")
    if settings.allow_private_urls:
        return None
    if u.scheme != "https":
        raise InputError(f"only https:// {what} URLs are accepted, not {shown_url(url)!r} "
                         "(a server set with EASEL_ALLOW_PRIVATE_URLS=true allows http:// and private addresses)")
    try:
        infos = socket.getaddrinfo(u.host, u.port or 443, proto=socket.IPPROTO_TCP)
    except UnicodeError as e:
        raise InputError(f"cannot resolve {u.host[:100]}: {e}") from None
    except OSError as e:  # gaierror included: a resolver's blip, or a name not there yet
        raise Unresolved(f"cannot resolve {u.host[:100]}: {e}") from None
    if not infos:
        raise Unresolved(f"cannot resolve {u.host[:100]}")
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if _non_public(ip):
            raise InputError(f"{u.host[:100]} resolves to a non-public address ({ip}); refused "
                             "(a server set with EASEL_ALLOW_PRIVATE_URLS=true allows private addresses)")
    return infos[0][4][0]  # the resolver's first choice (the last is its least preferred)


def pin_url(url: str, settings: Settings):
    """An SSRF-checked URL pinned to the address vetted now: (URL to request, headers,
    httpx extensions). The request then goes to that address, never to a second DNS answer
    (rebinding), and TLS still verifies the certificate for the hostname."""
    import httpx

    pinned = check_public_url(url, settings)
    u = httpx.URL(url)
    if pinned is None:
        return u, {}, {}
    return u.copy_with(host=pinned), {"Host": u.netloc.decode("ascii")}, {"sni_hostname": u.host}


def exchange(method: str, url: str, settings: Settings, *, timeout_s: float, body_limit: int = 0,
             content: bytes | None = None, headers: dict[str, str] | None = None, verify=True,
             transport=None) -> tuple[int, bytes]:
    """One request to a URL a user named: SSRF-checked and pinned to the vetted address
    (``pin_url``), no redirects, no proxies or .netrc from the environment, and the whole
    exchange (connection, request, answer, body) cut off after ``timeout_s`` however the
    server paces it. Returns (status, body): a 200's body is read up to ``body_limit`` bytes
    (InputError past it), no other answer's body is read.

    Raises InputError for a refused URL (``Unresolved`` for a name that does not resolve
    now), TimeoutError past the deadline, ``httpx.HTTPError`` when the network fails.
    ``verify`` and ``transport`` go to the httpx client (a shared TLS context; tests). The
    name's lookup (``pin_url``) comes before the deadline starts and is bounded by the
    system resolver's own timeouts."""
    target, pinned, extensions = pin_url(url, settings)

    async def bounded() -> tuple[int, bytes]:
        return await asyncio.wait_for(_exchange(method, target, {**(headers or {}), **pinned}, extensions, content,
                                                body_limit, timeout_s, verify, transport, url), timeout_s)

    try:
        return _run_in_own_loop(bounded)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{shown_url(url)}: no complete answer within {timeout_s:g}s") from None


def _run_in_own_loop(make: Callable[[], Awaitable[T]]) -> T:
    """``make()``'s result, awaited in an event loop of its own (the deadline must hold where
    each read is within its timeout, which only cancellation gives), leaving the thread's
    own loop alone; from a thread already running a loop, in a short-lived thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(make())
        finally:
            loop.close()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_run_in_own_loop, make).result()


async def _exchange(method, target, headers, extensions, content, body_limit, timeout_s, verify, transport,
                    url) -> tuple[int, bytes]:
    """``exchange``'s request, with a client of its own: requests go to pinned addresses, so
    no connection is kept alive (two names behind one address must not share a TLS session
    checked for the other's name)."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False, verify=verify,
                                 transport=transport) as http, \
            http.stream(method, target, content=content, headers=headers, extensions=extensions) as r:
        if r.status_code != 200 or not body_limit:
            return r.status_code, b""
        declared = r.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > body_limit:
            raise InputError(f"{shown_url(url)} is {declared} bytes, over the {body_limit}-byte limit")
        chunks, total = [], 0
        async for chunk in r.aiter_bytes():
            total += len(chunk)
            if total > body_limit:
                raise InputError(f"{shown_url(url)} is over the {body_limit}-byte limit")
            chunks.append(chunk)
        return r.status_code, b"".join(chunks)


def _certificate_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch_url(url: str, settings: Settings) -> bytes:
    """Download an image URL (``exchange``): bounded in bytes (``max_input_bytes``) and in
    total time (``url_fetch_timeout_s``), so no server can hold a worker."""
    import httpx

    try:
        status, body = exchange("GET", url, settings, timeout_s=settings.url_fetch_timeout_s,
                                body_limit=settings.max_input_bytes)
    except Unresolved as e:  # DNS may answer on a retry, as a submission's 503 says
        raise SourceUnavailable(str(e)) from None
    except TimeoutError:  # the whole download's deadline: a server this slow stays slow
        raise InputError(f"{shown_url(url)} took longer than {settings.url_fetch_timeout_s:g}s to download") from None
    except (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError) as e:
        if _certificate_refused(e):  # a retry meets the same certificate
            raise InputError(f"cannot fetch {shown_url(url)}: its TLS certificate was refused ({str(e)[:200]})") from None
        raise SourceUnavailable(f"cannot fetch {shown_url(url)} now: {type(e).__name__}: {str(e)[:200]}") from None
    except httpx.HTTPError as e:
        raise InputError(f"cannot fetch {shown_url(url)}: {type(e).__name__}: {str(e)[:200]}") from None
    if status >= 500 or status == 429:
        raise SourceUnavailable(f"GET {shown_url(url)} returned HTTP {status}, for now")
    if status != 200:
        raise InputError(f"GET {shown_url(url)} returned HTTP {status}"
                         + (" (redirects are not followed)" if 300 <= status < 400 else ""))
    return body


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
