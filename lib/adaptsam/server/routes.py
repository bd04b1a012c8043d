"""HTTP routes the stock MONAI Label server lacks, installed when the app starts.

- `POST /infer/{model}` replaces the stock route (it is matched first). The stock handler is
  `async` but calls the model directly, so one long request (a volume being encoded) blocks
  the event loop for every client. Ours runs the same work in a worker thread; it keeps an
  uploaded mask under its own key (the stock one puts it under `label`, where Slicer puts the
  segment name), never lets params name a server file, and answers bad input with 4xx.
- `GET /adaptsam/progress`: background encoding progress and cache statistics.
- `POST /adaptsam/serve/{model}?version=N|latest`: rollback.

The app object is used only through `model_names`, `infer`, `serve_version`,
`adaptsam_status`, `datastore` and `sessions` (server/app.py).
"""

import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, File, Form, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from ..engine.errors import RequestError

logger = logging.getLogger(__name__)

# keys of a request the server sets itself; a client's params may not replace them
SERVER_KEYS = ("model", "image", "mask_prompt", "session", "session_id", "save_label", "label_tag")


def build_router(app_getter) -> APIRouter:
    from monailabel.datastore.utils.convert import binary_to_image
    from monailabel.endpoints.infer import ResultType, send_response
    from monailabel.interfaces.exception import MONAILabelException
    from monailabel.utils.others.generic import remove_file

    router = APIRouter()

    def _save_upload(upload: UploadFile, background_tasks: BackgroundTasks) -> str:
        name = pathlib.Path(upload.filename or "upload.nii.gz").name
        ext = "".join(pathlib.Path(name).suffixes)[-16:] or ".nii.gz"
        fd, path = tempfile.mkstemp(suffix=ext)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        background_tasks.add_task(remove_file, path)
        return path

    def _infer(model, image, session_id, params, file_path, label_path):
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        try:
            p = json.loads(params) if params else {}
        except ValueError:
            raise HTTPException(422, "params is not valid JSON")
        if not isinstance(p, dict):
            raise HTTPException(422, "params must be a JSON object")
        reserved = sorted(k for k in p if k in SERVER_KEYS)
        if reserved:
            raise HTTPException(422, f"params may not set {reserved}: the image is chosen by ?image=, a mask by the label upload")
        request = {**p, "model": model, "image": image}
        if file_path:
            request["image"] = file_path
        elif session_id:
            session = instance.sessions().get_session(session_id)
            if not session:
                raise HTTPException(404, f"session {session_id!r} not found")
            request["image"] = session.image
        elif not image:
            raise HTTPException(422, "no image: give ?image=<id>, a session_id or a file")
        else:
            uri = instance.datastore().get_image_uri(image)
            if not uri or not os.path.exists(uri):
                raise HTTPException(404, f"image {image!r} not found in the datastore")
        if label_path:
            if label_path.endswith(".bin"):  # OHIF v2 sends raw voxels
                try:
                    label_path = binary_to_image(instance.datastore().get_image_uri(image), label_path)
                except Exception as e:
                    raise HTTPException(422, f"uploaded .bin label does not match the image: {e}")
            request["mask_prompt"] = label_path
        try:
            result = instance.infer(request)
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        except MONAILabelException as e:
            raise HTTPException(422, e.msg)
        return instance, result

    @router.post("/infer/{model}")
    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[ResultType] = None,
    ):
        file_path = _save_upload(file, background_tasks) if file else None
        label_path = _save_upload(label, background_tasks) if label else None
        instance, result = await run_in_threadpool(_infer, model, image, session_id, params, file_path, label_path)
        return send_response(instance.datastore(), result, output, background_tasks)

    @router.post("/adaptsam/serve/{model}")
    async def serve_version(model: str, version: str = "latest"):
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        if not (version == "latest" or version.isdigit() or (version[:1] == "c" and version[1:].isdigit())):
            raise HTTPException(422, "version must be a published version number, a candidate (cN) or 'latest'")
        try:
            return await run_in_threadpool(instance.serve_version, model, version)
        except FileNotFoundError as e:
            raise HTTPException(404, str(e))

    @router.get("/adaptsam/candidates/{model}")
    async def candidates(model: str):
        """Training results the publish gate kept back, with why."""
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        return instance.candidates(model)

    @router.post("/adaptsam/candidates/{model}/publish")
    async def publish_candidate(model: str, candidate: str):
        """Override the gate: publish a kept candidate as the next version (logged)."""
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        try:
            return await run_in_threadpool(instance.publish_candidate, model, candidate)
        except FileNotFoundError as e:
            raise HTTPException(404, str(e))

    @router.get("/adaptsam/progress")
    async def progress():
        return app_getter().adaptsam_status()

    return router


def install(fastapi_app, app_getter, prefix: str = "") -> None:
    """Add our routes *in front of* the stock ones so they win the match."""
    routes = fastapi_app.router.routes
    n = len(routes)
    fastapi_app.include_router(build_router(app_getter), prefix=prefix)
    ours = routes[n:]
    del routes[n:]
    routes[0:0] = ours
    fastapi_app.openapi_schema = None
