"""The `/datastore` routes, checked, in front of MONAI Label's own (which they replace).

MONAI Label's handlers trust their input: an id with `../` reads, writes or deletes files
outside the studies folder, any bytes are stored as a `final` label (training data), unknown
ids answer 200 `{}` and bad JSON 500. These take the same requests and answer the same way
when the request is good; otherwise nothing is touched and the client gets a 4xx saying why:

- ids and tags are plain names (security.unsafe_name; the guard checks the query too) and
  must exist where they are read or deleted (404);
- an uploaded image is a readable 2D/3D volume of an accepted format within the size limit;
- a label is the image's shape and geometry with small whole values (engine/uploads.py);
- temp files are removed whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Dict, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from ..engine.errors import RequestError
from ..engine.uploads import IMAGE_SUFFIXES, LABEL_SUFFIXES, check_image_upload, load_label, suffix_of
from ..engine.volume import Volume
from .security import unsafe_name

logger = logging.getLogger(__name__)

TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BIN = ".bin"  # OHIF v2 sends the label as raw uint8 voxels of the image


def parse_json_object(text: Optional[str], what: str) -> Dict[str, Any]:
    """A form field that must hold a JSON object; 422 otherwise (deep nesting included)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise HTTPException(422, f"{what} is not valid JSON")
    if not isinstance(value, dict):
        raise HTTPException(422, f"{what} must be a JSON object")
    return value


def checked_name(value: str, what: str) -> str:
    why = unsafe_name(value or "")
    if not value or why:
        raise HTTPException(422, f"{what} {value!r} {why or 'is empty'}")
    return value


def checked_tag(tag: str) -> str:
    if not TAG.match(tag or ""):
        raise HTTPException(422, f"tag {tag!r} must be 1-64 letters, digits, '_' or '-'")
    return tag


def save_upload(upload: UploadFile, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="adaptsam-upload-")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


def remove_quietly(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def build_router(app_getter, user_dependency, annotator_dependency, admin_dependency, max_upload: int) -> APIRouter:
    router = APIRouter(prefix="/datastore", tags=["Datastore"])

    def datastore():
        return app_getter().datastore()

    async def threaded(fn, *args):
        """Run a handler's work off the event loop; a RequestError (e.g. the PACS did not
        answer: 503) becomes its HTTP status."""
        try:
            return await run_in_threadpool(fn, *args)
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))

    def require_image(image: str) -> str:
        checked_name(image, "image")
        if image not in datastore().list_images():
            raise HTTPException(404, f"image {image!r} not found in the datastore")
        return image

    def require_label(label: str, tag: str) -> str:
        checked_name(label, "label")
        checked_tag(tag)
        uri = datastore().get_label_uri(label, tag)
        if not uri or not os.path.isfile(uri):
            raise HTTPException(404, f"no {tag!r} label {label!r} in the datastore")
        return uri

    # ---- images -------------------------------------------------------------------------------

    def add_image(image: Optional[str], params: str, file: UploadFile, username: str):
        name = pathlib.Path(file.filename or "").name
        try:
            ext = suffix_of(name, IMAGE_SUFFIXES)
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        image_id = checked_name(image or name[: -len(ext)], "image")
        info = parse_json_object(params, "params")
        path = save_upload(file, ext)
        try:
            check_image_upload(path, max_upload * 8)
            if username:
                info["user"] = username
            return {"image": datastore().add_image(image_id, path, info)}
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        finally:
            remove_quietly(path)

    @router.put("/image", summary="Upload a new image (checked)")
    @router.put("/", include_in_schema=False, deprecated=True)
    async def api_add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                            user=Depends(annotator_dependency)):
        return await threaded(add_image, image, params, file, getattr(user, "username", ""))

    @router.delete("/image", summary="Remove an image and its labels")
    @router.delete("/", include_in_schema=False, deprecated=True)
    async def api_remove_image(id: str, user=Depends(admin_dependency)):
        def run():
            require_image(id)
            datastore().remove_image(id)
            return {}

        return await threaded(run)

    def image_file(image: str, check_sum: Optional[str] = None) -> str:
        require_image(image)
        uri = datastore().get_image_uri(image)
        if not uri or not os.path.isfile(uri):
            raise HTTPException(404, f"image {image!r} not found in the datastore")
        if check_sum:
            algo, _, digest = check_sum.rpartition(":")
            algo = (algo or "sha256").lower()
            if algo not in hashlib.algorithms_guaranteed:
                raise HTTPException(422, f"check_sum algorithm {algo!r} is not one of {sorted(hashlib.algorithms_guaranteed)}")
            h = hashlib.new(algo)
            with open(uri, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if not hmac_equal(h.hexdigest(), digest):
                raise HTTPException(404, f"image {image!r} not found (checksum differs)")
        return uri

    @router.head("/image", summary="Does an image exist")
    async def api_check_image(image: str, check_sum: Optional[str] = None, user=Depends(user_dependency)):
        await threaded(image_file, image, check_sum)
        return {}

    @router.get("/image", summary="Download an image")
    async def api_download_image(image: str, user=Depends(user_dependency)):
        from fastapi.responses import FileResponse

        uri = await threaded(image_file, image)
        return FileResponse(uri, filename=os.path.basename(uri))

    @router.get("/image/info", summary="An image's info")
    async def api_get_image_info(image: str, user=Depends(user_dependency)):
        return await threaded(lambda: (require_image(image), datastore().get_image_info(image))[1])

    @router.put("/image/info", summary="Update an image's info")
    async def api_put_image_info(image: str, info: str = Form("{}"), user=Depends(annotator_dependency)):
        def run():
            require_image(image)
            values = parse_json_object(info, "info")
            if getattr(user, "username", ""):
                values["user"] = user.username
            return datastore().update_image_info(image, values)

        return await threaded(run)

    # ---- labels -------------------------------------------------------------------------------

    def save_label(image: str, params: str, tag: str, label: UploadFile, username: str):
        require_image(image)
        checked_tag(tag or "final")
        info = parse_json_object(params, "params")
        name = pathlib.Path(label.filename or "label.nii.gz").name
        try:
            ext = BIN if name.lower().endswith(BIN) else suffix_of(name, LABEL_SUFFIXES)
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        instance = app_getter()
        path, converted = save_upload(label, ext), None
        try:
            image_uri = instance.datastore().get_image_uri(image)
            volume = Volume.load(image_uri)
            if ext == BIN:
                expected = int(volume.array.size)
                if os.path.getsize(path) != expected:
                    raise HTTPException(422, f"a .bin label holds one byte per voxel: {expected} bytes, got {os.path.getsize(path)}")
                from monailabel.datastore.utils.convert import binary_to_image

                path, converted = binary_to_image(image_uri, path), path
            load_label(path, volume)  # refuses anything that is not this image's label map
            if username:
                info["user"] = username
            label_id = instance.datastore().save_label(image, path, tag or "final", info)
            result = instance.on_save_label(image, label_id) or {}
            result.update(image=image, label=label_id)
            return result
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        finally:
            remove_quietly(path)
            remove_quietly(converted)

    @router.put("/label", summary="Save a finished label (checked against its image)")
    async def api_save_label(image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...),
                             user=Depends(annotator_dependency)):
        return await threaded(save_label, image, params, tag, label, getattr(user, "username", ""))

    @router.delete("/label", summary="Remove a label")
    async def api_remove_label(id: str, tag: str, user=Depends(admin_dependency)):
        def run():
            require_label(id, tag)
            datastore().remove_label(id, tag)
            return {}

        return await threaded(run)

    @router.head("/label", summary="Does an image have a label with this tag")
    async def api_check_label(image: str, tag: str, user=Depends(user_dependency)):
        def run():
            require_image(image)
            checked_tag(tag)
            if not datastore().get_label_by_image_id(image, tag):
                raise HTTPException(404, f"image {image!r} has no {tag!r} label")
            return {}

        return await threaded(run)

    @router.get("/label", summary="Download a label")
    async def api_download_label(label: str, tag: str, user=Depends(user_dependency)):
        from fastapi.responses import FileResponse

        uri = await threaded(require_label, label, tag)
        return FileResponse(uri, filename=os.path.basename(uri))

    @router.get("/label/info", summary="A label's info")
    async def api_get_label_info(label: str, tag: str, user=Depends(user_dependency)):
        return await threaded(lambda: (require_label(label, tag), datastore().get_label_info(label, tag))[1])

    def update_label_info(label: str, tag: str, text: str, username: str):
        require_label(label, tag)
        values = parse_json_object(text, "info")
        if username:
            values["user"] = username
        return datastore().update_label_info(label, tag, values)

    @router.put("/label/info", summary="Update a label's info")
    async def api_put_label_info(label: str, tag: str, info: str = Form("{}"), user=Depends(annotator_dependency)):
        return await threaded(update_label_info, label, tag, info, getattr(user, "username", ""))

    @router.put("/updatelabelinfo", include_in_schema=False, deprecated=True)
    async def api_update_label_info(label: str, tag: str, params: str = Form("{}"), user=Depends(annotator_dependency)):
        return await threaded(update_label_info, label, tag, params, getattr(user, "username", ""))

    return router


def hmac_equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.lower().encode(), b.lower().encode())
