"""Input images: a direct upload (checked here) or a presigned POST straight to S3 (bounded
by the S3 server, checked by the worker like any input)."""
from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile

from easel.producer.api.deps import ApiDep, Caller, json_content, multipart_content
from easel.producer.api.errors import problems
from easel.producer.api.models import PresignRequest, PresignResponse, UploadResponse
from easel.shared.images import InputError, decode_image, image_ext

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

_EXT = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def _image_for_a_job(description: str, when: str = "") -> dict:
    """A success response with a link to create_job taking the returned `image` as its input."""
    link = {"operationId": "create_job", "requestBody": {"input": {"image": "$response.body#/image"}},
            "description": f"a job whose input is this image{when}"}
    return {"description": description, "links": {"UseInJob": link}}


@router.post("", status_code=201, operation_id="upload_image", dependencies=[Depends(multipart_content)],
             responses={201: _image_for_a_job("the image was stored"),
                        **problems(400, 401, 413, 415, 422, 429, 503,
                                   _413="the upload is over EASEL_MAX_INPUT_BYTES (the rest of it is not read)",
                                   _422="not a readable PNG, JPEG, WEBP, GIF, BMP or TIFF image within the "
                                        "size limits")})
def upload(file: Annotated[UploadFile, File(description="PNG, JPEG, WEBP, GIF, BMP or TIFF image")], p: Caller,
           api: ApiDep) -> UploadResponse:
    """Upload an input image (PNG, JPEG, WEBP, GIF, BMP or TIFF; a presigned upload takes PNG,
    JPEG or WEBP only); use the returned `image` in a job. Stored content-addressed."""
    limit = api.s.max_input_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload is over the {limit}-byte limit")
    try:
        img = decode_image(data, api.s, "upload")
    except InputError as e:
        raise HTTPException(422, str(e)) from None
    ref = api.client.storage.put_input(data, image_ext(data), img.size)
    return UploadResponse(image=ref, bytes=len(data), width=img.width, height=img.height)


@router.post("/presign", operation_id="presign_upload", dependencies=[Depends(json_content)],
             responses={200: _image_for_a_job("where and how to POST the image", ", once the POST succeeded"),
                        **problems(400, 401, 413, 415, 422, 429, 503)})
def presign_upload(body: PresignRequest, p: Caller, api: ApiDep) -> PresignResponse:
    """A presigned POST for a large input, bounded in size and type by the S3 server; the
    worker checks the image like any input."""
    s = api.s
    key = f"uploads/{p.name}/{uuid.uuid4().hex}.{_EXT[body.content_type]}"
    ttl = s.api_presign_ttl_s
    api.client.storage.ensure_bucket()
    post = api.public_storage.presign_upload(key, body.content_type, s.max_input_bytes, ttl)
    return PresignResponse(url=post["url"], fields=post["fields"], max_bytes=s.max_input_bytes,
                           image=f"s3://{s.s3_bucket}/{key}", expires_at=time.time() + ttl)
