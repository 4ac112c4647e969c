"""Bad input: the job schema, the client's refusals and image decoding under fuzzing.

In-process property tests (hypothesis) for the schema, the client and ``decode_image``;
one end-to-end test (slow) that feeds a real worker bad objects straight from S3.
Every bad input must end as a clear refusal (ValidationError / SubmitError / InputError)
or a failed job with a reason: never another exception, a dead worker, or a write
outside the job's own prefix.
"""
from __future__ import annotations

import base64
import io
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from PIL import Image
from pydantic import ValidationError

from easel.producer.client import EaselClient, SubmitError
from easel.shared.images import InputError, decode_image
from easel.shared.schema import MAX_PROMPT_CHARS, JobSpec
from easel.shared.settings import Settings
from tests.conftest import img2img_job, png_bytes

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SETTINGS = Settings(_env_file=None, redis_url="redis://127.0.0.1:9/0", s3_endpoint_url="http://127.0.0.1:9")


# -- crafted images ---------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h RGB but which carries (almost) no pixel data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def png_bomb(w: int, h: int) -> bytes:
    """A real, complete, all-black w x h RGB PNG: tiny on disk, w*h*3 bytes decoded."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def gif_header(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, w, h) + b"\x00\x02\x02\x44\x01\x00\x3b"


def bmp_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0))


def encoded(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    img = Image.new(mode, size)
    for x in range(size[0]):
        img.putpixel((x, x % size[1]), 255 if mode in ("L", "1", "P") else (255,) * len(mode))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


GOOD = {fmt: encoded(fmt, (24, 16)) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")}
GOOD_PNG = GOOD["PNG"]


def assert_readable(e: InputError, what: str = "image") -> None:
    msg = str(e)
    assert msg.startswith(what), msg
    assert 10 < len(msg) < 600 and "\n" not in msg and "Traceback" not in msg, msg


def decode_or_refuse(data: bytes, s: Settings = SETTINGS) -> Image.Image | None:
    """The property every decode must have: an RGB image within limits, or an InputError."""
    try:
        img = decode_image(data, s)
    except InputError as e:
        assert_readable(e)
        return None
    assert img.mode == "RGB"
    w, h = img.size
    assert 8 <= w and 8 <= h and w * h <= s.max_image_pixels and max(w, h) <= s.max_side
    return img


# -- decode_image -----------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"GIF89a")
@example(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
def test_decode_arbitrary_bytes_only_input_error(data):
    decode_or_refuse(data)


@FUZZ
@given(fmt=st.sampled_from(sorted(GOOD)), data=st.data())
def test_decode_mutated_images_only_input_error(fmt, data):
    """Valid images of every accepted format with flipped bytes, inserted junk or a cut tail."""
    buf = bytearray(GOOD[fmt])
    for _ in range(data.draw(st.integers(0, 8), label="flips")):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[:data.draw(st.integers(0, len(buf)), label="cut")]
    decode_or_refuse(bytes(buf))


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_decode_every_truncation_refused(fmt):
    whole = GOOD[fmt]
    assert decode_or_refuse(whole) is not None
    refused = [cut for cut in range(len(whole)) if decode_or_refuse(whole[:cut]) is None]
    if fmt == "PNG":
        # Every cut that loses compressed pixel data is refused; a cut zlib checksum (last 4 bytes of
        # IDAT data), IDAT CRC or IEND trailer leaves the pixels whole and is tolerated.
        idat = whole.index(b"IDAT")
        pixels_end = idat + 4 + struct.unpack(">I", whole[idat - 4:idat])[0] - 4
        assert set(range(pixels_end)) <= set(refused)
    else:  # other decoders may fill a few missing rows, which is harmless; most cuts are refused
        assert len(refused) > len(whole) // 2


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (png_header_only(0, 0), "readable"),
    (png_header_only(0, 64), "readable"),
    (png_header_only(100_000, 100_000), "decompression bomb"),
    (png_header_only(100_000, 1), "100000x1"),
    (png_header_only(5000, 5000), "5000x5000"),
    (png_header_only(4, 4), "minimum"),
    (gif_header(65535, 65535), "bomb"),
    (gif_header(0, 0), "readable"),
    (bmp_header(60000, 60000), "bomb"),
    (b"hello world, not an image", "not a readable image"),
    (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "not a readable image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),
], ids=["empty", "png-0x0", "png-0xh", "png-100k-square", "png-100k-wide", "png-over-limit", "png-4px",
        "gif-65535", "gif-0x0", "bmp-60000", "text", "svg", "eps"])
def test_decode_refuses_bad_images_with_reason(data, needle):
    with pytest.raises(InputError) as e:
        decode_image(data, SETTINGS, "input image")
    assert_readable(e.value, "input image")
    assert needle in str(e.value)


def test_decode_refuses_other_formats_it_could_parse():
    """Only PNG/JPEG/WEBP/GIF/BMP/TIFF decoders see untrusted bytes (no EPS/Ghostscript, ICO, TGA...)."""
    for fmt in ("ICO", "TGA", "PPM", "PCX", "SGI", "EPS"):
        with pytest.raises(InputError, match="not a readable image"):
            decode_image(encoded(fmt, (32, 32)), SETTINGS)
    for fmt, data in GOOD.items():
        assert decode_image(data, SETTINGS).size == (24, 16), fmt


def test_decode_turns_a_phone_photo_upright_and_scales_16_bit_grey():
    sideways = Image.new("RGB", (32, 16), "blue")
    sideways.paste((255, 0, 0), (0, 0, 16, 16))  # its left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: to be shown turned 90 degrees clockwise, as phones store portraits
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", exif=exif.tobytes())
    upright = decode_image(buf.getvalue(), SETTINGS)
    assert upright.size == (16, 32)
    assert upright.getpixel((8, 4))[0] > 200 and upright.getpixel((8, 28))[0] < 60  # the left half went up

    depth = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))  # 0..65520
    buf = io.BytesIO()
    depth.save(buf, format="PNG")
    grey = np.asarray(decode_image(buf.getvalue(), SETTINGS))
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[-1, -1].tolist() == [255, 255, 255]
    assert grey[32, 0, 0] == 32 * 64 * 16 >> 8  # the middle grey, not clipped to white


def test_decoded_images_carry_no_metadata():
    """A small PNG may carry tens of MB of compressed text chunks, which Pillow keeps on the
    image through every copy; a worker caches decoded inputs by their pixels' size, so the
    decoded image holds pixels only."""
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    for k in range(3):  # 2.7 MB of text (Pillow takes up to 1 MB a chunk), compressed to a few KB
        text.add_text(f"note{k}", "x" * 900_000, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG", pnginfo=text)
    assert len(buf.getvalue()) < 20_000
    img = decode_image(buf.getvalue(), SETTINGS)
    assert img.info == {} and img.getpixel((0, 0)) == (255, 0, 0)


def test_decode_small_compressible_bomb_refused_by_configured_limit():
    bomb = png_bomb(2048, 2048)  # 12 MB decoded, ~12 KB on disk
    assert len(bomb) < 50_000
    small = Settings(_env_file=None, max_image_pixels=1024 * 1024)
    with pytest.raises(InputError, match="2048x2048, over the limit of 1048576 pixels"):
        decode_image(bomb, small)
    assert decode_image(bomb, SETTINGS).size == (2048, 2048)  # within the default limit it is just an image
    with pytest.raises(InputError, match="over the 1000-byte limit"):
        decode_image(bomb, Settings(_env_file=None, max_input_bytes=1000))


def test_decode_bomb_never_allocates_its_decoded_size():
    """A 9000x9000 RGB bomb (243 MB decoded, ~240 KB compressed) is refused from its header:
    the decoding process's peak RSS grows by far less than the decoded size."""
    code = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
from tests.test_fuzz import png_bomb, png_header_only
from easel.shared.images import InputError, decode_image
from easel.shared.settings import Settings
s = Settings(_env_file=None)
bombs = [png_bomb(9000, 9000), png_header_only(100000, 100000), png_header_only(4096, 4097)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for b in bombs:
    try:
        decode_image(b, s)
        print("DECODED"); sys.exit(1)
    except InputError as e:
        print("refused:", e)
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("refused:") == 3, out.stdout
    grew_kb = int(re.search(r"grew_kb (\d+)", out.stdout).group(1))
    assert grew_kb < 40_000, out.stdout  # the bomb alone would be 243,000 KB


def test_small_files_decoded_at_once_stay_within_the_decode_budget():
    """Twelve 58 KB PNGs of 4096x4096 decoded on twelve threads (an API's burst of uploads):
    a decode holds memory for its pixels, so the process grows by about four decodes (the
    budget), not twelve (about 1.5 GB)."""
    code = r"""
import io, resource, sys, threading
from PIL import Image
from easel.shared.images import DECODES_AT_ONCE, decode_image
from easel.shared.settings import Settings
buf = io.BytesIO()
Image.new("RGB", (4096, 4096), (70, 130, 90)).save(buf, "PNG")
s, data, start = Settings(_env_file=None), buf.getvalue(), threading.Barrier(12)
assert len(data) < 100_000 and s.max_image_pixels == 4096 * 4096 and DECODES_AT_ONCE == 4
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def decode():
    start.wait()
    decode_image(data, s)
threads = [threading.Thread(target=decode) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    grew_kb = int(re.search(r"grew_kb (\d+)", out.stdout).group(1))
    assert grew_kb < 1_000_000, out.stdout  # about 170 MB a decode; 1.55 GB without the budget


# -- the job schema ---------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**130), 2**130)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
traversal = st.sampled_from(["..", "../..", "../../etc/passwd", "/etc/passwd", ".", "a/../b", "%2e%2e%2f", "..%2f",
                             "a\x00b", "a\nb", "a\rb", "\x1b[31m", "C:\\Windows", "..\\..\\x", "~root", "sd15/../sd15",
                             "jobs/other/output/0.png", "\u202e", "s\u0336d15", "sd15 ", " sd15"])
refs = (st.sampled_from(["s3://easel/inputs/x.png", "https://example.com/a.png", "data:image/png;base64,AAAA",
                         "http://127.0.0.1/x.png", "file:///etc/passwd", "s3://easel/../x", "s3://easel//etc/passwd",
                         "s3://easel/a/../../b", "s3://easel/./x", "s3://", "s3:///k", "ftp://x/y", "gopher://x"])
        | traversal.map(lambda t: f"s3://easel/{t}") | traversal | json_values)
names = st.sampled_from(["sd15", "comic-diffusion", "nope", "", "x" * 129, "depth"]) | traversal | json_values
prompts = (st.text(max_size=200) | st.just("a" * 100_000) | st.just("é" * (MAX_PROMPT_CHARS + 1))
           | st.just("😀" * MAX_PROMPT_CHARS) | json_values)
stage = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from(["text2img", "img2img", "controlnet_img2img", "latent_upscale", "upscale", "IMG2IMG", ""]) | json_values,
    "model": names, "controlnet": names, "control_image": refs,
    "prompt": prompts, "negative_prompt": prompts, "prompt_syntax": st.sampled_from(["plain", "compel", "x"]) | json_values,
    "strength": st.floats() | st.integers(-10, 10) | json_values, "guidance_scale": st.floats() | json_values,
    "steps": st.integers(-(2**70), 2**70) | json_values, "seed": st.integers(-(2**70), 2**70) | json_values,
    "width": st.integers(-100, 10**9) | json_values, "height": st.integers(-100, 10**9) | json_values,
    "noise_level": st.integers() | json_values, "extra": json_values,
})
jobs = st.fixed_dictionaries({}, optional={
    "idempotency_key": st.text(max_size=250) | traversal | json_values,
    "priority": st.integers(-(2**70), 2**70) | json_values,
    "input": st.fixed_dictionaries({}, optional={"image": refs}) | json_values,
    "stages": st.lists(stage, max_size=3) | json_values,
    "num_images": st.integers(-(2**70), 2**70) | json_values,
    "output": st.fixed_dictionaries({}, optional={"format": st.sampled_from(["png", "webp", "jpeg", "gif", "../x"]) | json_values,
                                                  "quality": st.integers() | json_values,
                                                  "keep_intermediates": json_values}) | json_values,
    "unknown": json_values,
}) | json_values

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def assert_safe_ref(ref: str | None) -> None:
    if ref is None:
        return
    assert not _CTRL.search(ref[:4096])
    assert ref.startswith(("s3://", "https://", "http://", "data:image/")), ref
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        assert bucket and key and not key.startswith("/")
        assert not {"..", "."} & set(key.split("/")), ref


def assert_valid_spec(spec: JobSpec) -> None:
    """What a queued job may hold: bounded numbers, short prompts, safe names and references."""
    assert 0 <= spec.priority <= 9 and 1 <= spec.num_images <= 16 and 1 <= len(spec.stages) <= 16
    assert spec.idempotency_key is None or not _CTRL.search(spec.idempotency_key)
    assert_safe_ref(spec.input.image)
    for s in spec.stages:
        assert _SAFE_NAME.match(s.model) and (s.controlnet is None or _SAFE_NAME.match(s.controlnet))
        assert len(s.prompt) <= MAX_PROMPT_CHARS and len(s.negative_prompt or "") <= MAX_PROMPT_CHARS
        assert 0 < s.strength <= 1 and 1 <= s.steps <= 500 and 0 <= s.guidance_scale <= 100
        assert_safe_ref(s.control_image)
    # What the worker reads back from Redis is what was validated.
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs)
def test_jobspec_validation_only_validation_error(job):
    try:
        spec = JobSpec.model_validate(job)
    except ValidationError as e:
        assert e.errors()  # every refusal says where
        return
    assert_valid_spec(spec)


@FUZZ
@given(st.text(min_size=1, max_size=300))
def test_unicode_prompts_accepted_and_round_trip(prompt):
    assume(len(prompt) <= MAX_PROMPT_CHARS)
    spec = JobSpec.model_validate(img2img_job("s3://easel/inputs/x.png", prompt=prompt, negative_prompt=prompt[::-1]))
    assert spec.stages[0].prompt == prompt
    assert JobSpec.model_validate_json(spec.model_dump_json()).stages[0].prompt == prompt


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["a" * 100_000, "猫" * 100_000, "x" * (MAX_PROMPT_CHARS + 1)])
def test_huge_prompts_refused(field, text):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(img2img_job("s3://easel/inputs/x.png", **{field: text}))
    assert e.value.errors()[0]["loc"] == ("stages", 0, field)


def test_unicode_prompts_of_every_kind_accepted():
    for p in ["一只红色的狐狸", "лиса", "ثعلب أحمر", "🦊🔥" * 100, "e\u0301" * 500, "\u200b\u200d", "a\x00b", "(fox)1.5++ [blur]"]:
        assert JobSpec.model_validate(img2img_job("s3://easel/inputs/x.png", prompt=p)).stages[0].prompt == p


# -- the client: refusals name the field --------------------------------------------------------
@pytest.fixture(scope="module")
def offline_client():
    """An EaselClient that never reaches Redis or S3: uploads are recorded, DNS answers from a table."""
    c = EaselClient(SETTINGS)
    c.uploads = []

    def put_input(data: bytes, ext: str, size: tuple[int, int] | None = None) -> str:
        c.uploads.append((data, ext))
        return f"s3://easel/inputs/fake.{ext}"

    c.storage.put_input = put_input
    return c


@pytest.fixture(scope="module", autouse=True)
def _no_dns():
    """No test here may wait on DNS: IP literals and localhost resolve, other names fail at once."""
    import ipaddress
    import socket

    real = socket.getaddrinfo

    def fake(host, port, *a, **kw):
        try:
            ipaddress.ip_address(str(host).strip("[]"))
        except ValueError:
            if host != "localhost":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", fake)
        yield


BAD_FIELDS = {
    "priority": st.integers(10, 2**80) | st.integers(-(2**80), -1) | st.sampled_from(["high", 1.5, None, [], {}]),
    "num_images": st.integers(17, 2**80) | st.integers(-(2**80), 0) | st.sampled_from(["many", 2.5]),
    "idempotency_key": st.sampled_from(["", "a\x00b", "k" * 201, "\x1b[2J", 5, []]),
    "input.image": st.sampled_from(["s3://easel/../x", "s3://easel//etc/passwd", "ftp://x/y", "file:///etc/passwd",
                                    "s3://easel/a\x00b", 42, "x" * 3000]),
    "stages.0.strength": st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True) | st.just(float("nan")),
    "stages.0.steps": st.integers(501, 2**80) | st.integers(-(2**80), 0) | st.just("many"),
    "stages.0.guidance_scale": st.floats(max_value=0, exclude_max=True) | st.floats(min_value=100, exclude_min=True)
    | st.just(float("nan")),
    "stages.0.seed": st.integers(2**63, 2**90) | st.integers(-(2**80), -1),
    "stages.0.prompt": st.integers(MAX_PROMPT_CHARS + 1, 100_000).map(lambda n: "p" * n) | st.just(["a"]),
    "stages.0.negative_prompt": st.integers(MAX_PROMPT_CHARS + 1, 100_000).map(lambda n: "ñ" * n),
    "stages.0.model": traversal.filter(lambda t: not _SAFE_NAME.match(t)) | st.sampled_from(["", "m" * 129, "sd15/x"]),
    "stages.0.task": st.text(max_size=20).filter(lambda t: t not in ("text2img", "img2img", "controlnet_img2img",
                                                                    "latent_upscale", "upscale")),
    "stages.0.noise_level": st.integers(351, 2**70) | st.integers(-(2**70), -1),
    "output.format": st.sampled_from(["gif", "PNG", "../x", "", 3]),
    "output.quality": st.integers(101, 2**70) | st.integers(-(2**70), 0),
    "stages.0.controlnet_conditioning_scale": st.floats(min_value=10, exclude_min=True) | st.floats(max_value=0, exclude_max=True),
}


def _set(job: dict, path: str, value) -> dict:
    node = job
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node[parts[-1]] = value
    return job


@FUZZ
@given(data=st.data(), field=st.sampled_from(sorted(BAD_FIELDS)))
def test_client_refusal_names_the_field(offline_client, data, field):
    value = data.draw(BAD_FIELDS[field], label="value")
    job = _set(img2img_job("s3://easel/inputs/x.png"), field, value)
    for call in (offline_client.validate, offline_client.prepare):
        with pytest.raises(SubmitError) as e:
            call(job)
        msg = str(e.value)
        named = msg.startswith("invalid job: ") and field in msg
        # A string with no URL scheme is a local path to the client: refused as an unreadable file.
        named = named or (field == "input.image" and msg.startswith("input image: cannot read"))
        assert named, (field, value, msg)
    assert not offline_client.uploads


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs)
def test_client_prepare_only_submit_error(offline_client, job):
    """Whatever a caller hands prepare(): a spec ready to queue, or a SubmitError; never a crash."""
    if isinstance(job, dict):
        for ref in [(job.get("input") or {}).get("image") if isinstance(job.get("input"), dict) else None] + [
                s.get("control_image") for s in (job.get("stages") if isinstance(job.get("stages"), list) else [])
                if isinstance(s, dict)]:
            assume(not (isinstance(ref, str) and ref and Path(ref).exists()))  # not this machine's files
    try:
        spec = offline_client.prepare(job)
    except SubmitError as e:
        assert str(e)
        return
    assert_valid_spec(spec)
    assert all(s.seed is not None for s in spec.stages)
    for ref in [spec.input.image] + [s.control_image for s in spec.stages]:
        assert ref is None or ref.startswith(("s3://", "https://")), ref  # no data: blob ever reaches the broker


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("image, needle", [
    (_data_uri(b"not an image"), "not a readable image"),
    (_data_uri(GOOD_PNG[:40]), "image is not a readable image"),
    (_data_uri(png_header_only(100_000, 100_000)), "decompression bomb"),
    (_data_uri(png_header_only(5000, 5000)), "5000x5000"),
    (_data_uri(b""), "empty"),
    ("data:image/png;base64,@@@not-base64@@@", "base64"),
    ("/nonexistent/dir/input.png", "no such file"),
    ("../../../../etc/shadow-does-not-exist", "no such file"),
    ("http://example.com/x.png", "only https://"),
    ("https://127.0.0.1/x.png", "non-public"),
    ("https://localhost/x.png", "non-public"),
    ("https://10.0.0.1/x.png", "non-public"),
    ("https://[::1]/x.png", "non-public"),
    ("https://169.254.169.254/latest/meta-data", "non-public"),
    ("https://no-such-host.invalid/x.png", "cannot resolve"),
])
def test_prepare_refuses_bad_images_naming_them(offline_client, image, needle):
    for job in (img2img_job(image), {"input": {"image": "s3://easel/inputs/x.png"},
                                     "stages": [{"task": "controlnet_img2img", "model": "sd15", "control_image": image}]}):
        with pytest.raises(SubmitError) as e:
            offline_client.submit(job)
        msg = str(e.value)
        assert needle in msg, msg
        assert msg.startswith(("input image", "stage 0 control image", "invalid job")), msg
    assert not offline_client.uploads


def test_prepare_uploads_good_inline_image_as_s3_ref(offline_client):
    spec = offline_client.prepare(img2img_job(_data_uri(GOOD_PNG)))
    assert spec.input.image == "s3://easel/inputs/fake.png"
    assert offline_client.uploads.pop() == (GOOD_PNG, "png")


def test_a_chain_that_cannot_run_is_refused_before_its_local_files_are_uploaded(offline_client, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(GOOD_PNG)
    bad_chain = {"input": {"image": str(photo)}, "stages": [{"model": "sd15"}, {"task": "text2img", "model": "sd15"}]}
    with pytest.raises(SubmitError, match="text2img can only be the first stage"):
        offline_client.submit(bad_chain)
    assert not offline_client.uploads
    spec = offline_client.prepare({"input": {"image": str(photo)}, "stages": [
        {"task": "controlnet_img2img", "model": "sd15", "control_image": str(photo)}]})
    assert spec.input.image == spec.stages[0].control_image == "s3://easel/inputs/fake.png"
    assert offline_client.uploads == [(GOOD_PNG, "png")] * 2


@pytest.mark.parametrize("field", ["model", "controlnet"])
@pytest.mark.parametrize("name", ["..", ".", "../sd15", "sd15/..", "/sd15", "%2e%2e", "..%2fsd15", "sd15\x00", "sd15\n",
                                  "s\u0430d15"])
def test_traversal_in_model_names_refused_at_submission(offline_client, field, name):
    stage = {"task": "controlnet_img2img", "model": "sd15", "control_image": "s3://easel/inputs/c.png", field: name}
    with pytest.raises(SubmitError) as e:
        offline_client.submit({"input": {"image": "s3://easel/inputs/x.png"}, "stages": [stage]})
    assert field in str(e.value) or repr(name)[1:-1] in str(e.value), str(e.value)


@pytest.mark.parametrize("key", ["..", "../x", "a/../../b", "/etc/passwd", "//x", "./x", "a/./b", "x/.."])
def test_traversal_in_s3_keys_refused(offline_client, key):
    for job in (img2img_job(f"s3://easel/{key}"),
                {"input": {"image": "s3://easel/inputs/x.png"},
                 "stages": [{"task": "controlnet_img2img", "model": "sd15", "control_image": f"s3://easel/{key}"}]}):
        with pytest.raises(SubmitError, match=r"s3 key may not contain"):
            offline_client.submit(job)


@pytest.mark.parametrize("key", ["%2e%2e/x", "..%2f..%2fx", "a%00b", "..\\..\\x", "inputs/..x", "inputs/x..", "~/x"])
def test_encoded_traversal_in_s3_keys_is_literal(key):
    """S3 keys are flat strings: these are ordinary (odd) key names, sent percent-encoded by boto3."""
    from easel.shared.storage import S3Ref

    spec = JobSpec.model_validate(img2img_job(f"s3://easel/{key}"))
    assert S3Ref.parse(spec.input.image).key == key


@pytest.mark.parametrize("key", ["../../x", "/etc/passwd", "jobs/other/output", "easel:job:x", "*", "a b", "ключ", "%2e%2e"])
def test_idempotency_keys_are_opaque(key):
    """An idempotency key is only ever the suffix of one Redis key (easel:idem:<key>), never a path:
    odd ones are kept verbatim (the end-to-end test below checks where one lands)."""
    spec = JobSpec.model_validate({**img2img_job("s3://easel/inputs/x.png"), "idempotency_key": key})
    assert spec.idempotency_key == key


# -- end to end: bad objects straight from S3 ---------------------------------------------------
@pytest.mark.slow
def test_bad_objects_in_s3_fail_jobs_with_reasons_and_worker_survives(client, sd15_worker):
    """s3:// references skip the client's decode: the worker must refuse them itself."""
    storage, store = client.storage, client.store
    before = set(storage.list(""))
    bad = {
        "non-image": (b"this is not an image at all" * 10, "not a readable image"),
        "truncated-png": (png_bytes((64, 64))[:100], "could not be decoded"),
        "bomb": (png_bomb(9000, 9000), "9000x9000, over the limit"),
        "header-bomb": (png_header_only(100_000, 100_000), "decompression bomb"),
        "zero-byte": (b"", "empty"),
        "one-pixel": (encoded("PNG", (1, 1)), "under the minimum"),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),
    }
    good_ref = storage.put_input(png_bytes((64, 64)), "png")
    jobs: dict[str, str] = {}
    for name, (data, _) in bad.items():
        ref = storage.put_input(data, "png")  # looks like an image key; it is not one
        jobs[name] = client.submit(img2img_job(ref, steps=2))
    jobs["control:bomb"] = client.submit({"input": {"image": good_ref}, "stages": [
        {"task": "controlnet_img2img", "model": "sd15", "prompt": "x", "steps": 2,
         "control_image": storage.put_input(png_bomb(9000, 9000), "png")}]})
    with pytest.raises(SubmitError, match="s3://easel/inputs/does-not-exist.png does not exist"):
        client.submit(img2img_job("s3://easel/inputs/does-not-exist.png", steps=2))
    jobs["traversal-idem"] = client.submit({**img2img_job(good_ref, steps=2), "idempotency_key": "../../../etc/x"})
    expect = {**{k: v[1] for k, v in bad.items()}, "control:bomb": "control image is 9000x9000"}
    for name, job_id in jobs.items():
        st = client.wait(job_id, timeout=120)
        if name == "traversal-idem":
            assert st.state.value == "succeeded", st.error
            assert store.r.get("easel:idem:../../../etc/x") == job_id
            assert client.submit({**img2img_job(good_ref, steps=2), "idempotency_key": "../../../etc/x"}) == job_id
            continue
        assert st.state.value == "failed", (name, st)
        assert expect[name] in (st.error or ""), (name, st.error)
        assert "Traceback" not in st.error and len(st.error) < 600, st.error
        assert storage.list(f"jobs/{job_id}/") == [], name  # a refused input writes nothing
    assert sd15_worker.proc.poll() is None, "worker died"
    good = client.wait(client.submit(img2img_job(good_ref, steps=2)), timeout=120)
    assert good.state.value == "succeeded", good.error
    assert sd15_worker.proc.poll() is None
    # Nothing written outside inputs/ and jobs/<a submitted job>/.
    mine = set(jobs.values()) | {good.id}
    for key in set(storage.list("")) - before:
        if key.startswith("inputs/"):
            assert re.fullmatch(r"inputs/[0-9a-f]{64}\.[a-z]+", key), key
            continue
        m = re.fullmatch(r"jobs/([0-9a-f]{32})/.+", key)
        assert m, f"object written outside any job prefix: {key}"
        assert m.group(1) in mine or store.exists(m.group(1)), key
        assert ".." not in key.split("/")


def test_a_data_uri_wrapped_at_76_columns_decodes_as_unwrapped():
    """GNU base64 and MIME wrap lines; the payload is the same bytes."""
    from easel.shared.images import parse_data_uri

    data = png_bytes((40, 40))
    flat = base64.b64encode(data).decode()
    wrapped = "\n".join(flat[i:i + 76] for i in range(0, len(flat), 76)) + "\n"
    assert parse_data_uri("data:image/png;base64," + wrapped) == data
    with pytest.raises(InputError, match="not valid base64"):
        parse_data_uri("data:image/png;base64," + wrapped.replace("\n", "@", 1))
