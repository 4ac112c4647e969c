"""Schemathesis hooks for tests/test_api.py::test_schemathesis_all_checks_pass.

POST /v1/jobs refuses an ``s3://`` input of easel's bucket that does not exist (a 422), and a
generated reference names no real object: the stateful phase would create no job to read,
cancel, follow or hide from the other key. A valid (positive) case's ``s3://`` input is
pointed at an image the test uploaded (``EASEL_FUZZ_IMAGE``); negative cases go as generated.
"""
from __future__ import annotations

import os

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    image = os.environ.get("EASEL_FUZZ_IMAGE")
    if not image or case.method.upper() != "POST" or case.path != "/v1/jobs":
        return
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("input"), dict) and str(body["input"].get("image", "")).startswith("s3://"):
        body["input"]["image"] = image
