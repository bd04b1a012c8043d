"""HTTP routes the stock MONAI Label server lacks, installed when the app starts.

- `POST /infer/{model}` replaces the stock route (it is matched first). The stock handler is
  `async` but calls the model directly, so one long request (a volume being encoded) blocks
  the event loop for every client. Ours runs the same work in a worker thread; it keeps an
  uploaded mask under its own key (the stock one puts it under `label`, where Slicer puts the
  segment name), never lets params name a server file, and answers bad input with 4xx.
- `GET /adaptsam/progress`: background encoding progress and cache statistics.
- `POST /adaptsam/serve/{model}?version=N|latest`: rollback.
- `POST /train/{model}`: the stock route, but an unknown model is 404 and bad options 422
  before a training process starts (the stock one answers 200 and fails in the background).
- `/auth/...` in token mode (security.py): what Slicer asks before it logs in.
- `/datastore/...`: checked versions of the stock routes (datastore_routes.py).

Every route takes MONAI Label's RBAC dependency, so its Keycloak mode covers these too.

The app object is used only through `model_names`, `infer`, `serve_version`,
`adaptsam_status`, `datastore` and `sessions` (server/app.py).
"""

import hmac
import logging
import os
import pathlib
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from ..engine.errors import RequestError
from ..engine.uploads import IMAGE_SUFFIXES, LABEL_SUFFIXES, check_image_upload, suffix_of
from . import datastore_routes
from .datastore_routes import parse_json_object, remove_quietly, save_upload
from .infer_task import PARAMS

logger = logging.getLogger(__name__)

# keys of a request the server sets itself; a client's params may not replace them
SERVER_KEYS = ("model", "image", "mask_prompt", "session", "session_id", "save_label", "label_tag")


def build_router(app_getter, max_upload: int) -> APIRouter:
    from monailabel.config import settings
    from monailabel.datastore.utils.convert import binary_to_image
    from monailabel.endpoints.infer import ResultType, send_response
    from monailabel.endpoints.user.auth import RBAC
    from monailabel.interfaces.exception import MONAILabelException

    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    admin_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
    router = APIRouter()

    def _save_upload(upload: UploadFile, allowed) -> str:
        name = pathlib.Path(upload.filename or "upload.nii.gz").name
        try:
            ext = ".bin" if name.lower().endswith(".bin") else suffix_of(name, allowed)
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))
        return save_upload(upload, ext)

    def _infer(model, image, session_id, params, file_path, label_path):
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        p = parse_json_object(params, "params")
        reserved = sorted(k for k in p if k in SERVER_KEYS)
        if reserved:
            raise HTTPException(422, f"params may not set {reserved}: the image is chosen by ?image=, a mask by the label upload")
        unknown = sorted(k for k in p if k not in PARAMS)
        if unknown:
            raise HTTPException(422, f"unknown params {unknown[:10]}; valid: {list(PARAMS)}")
        request = {**p, "model": model, "image": image}
        if file_path:
            try:
                check_image_upload(file_path, max_upload * 8)
            except RequestError as e:
                raise HTTPException(e.status_code, str(e))
            request["image"] = file_path
        elif session_id:
            session = instance.sessions().get_session(session_id)
            if not session:
                raise HTTPException(404, f"session {session_id!r} not found")
            request["image"] = session.image
        elif not image:
            raise HTTPException(422, "no image: give ?image=<id>, a session_id or a file")
        else:
            try:
                uri = instance.datastore().get_image_uri(image)
            except RequestError as e:  # a PACS that does not answer
                raise HTTPException(e.status_code, str(e))
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
        user=user_role,
    ):
        file_path = label_path = None
        try:  # the uploads are inputs only: gone once answered, or refused
            file_path = _save_upload(file, IMAGE_SUFFIXES) if file else None
            label_path = _save_upload(label, LABEL_SUFFIXES) if label else None
            instance, result = await run_in_threadpool(_infer, model, image, session_id, params, file_path, label_path)
        finally:
            remove_quietly(file_path)
            remove_quietly(label_path)
        if output == ResultType.dicom_seg:
            result["dicom_seg"] = await run_in_threadpool(_dicom_seg, instance, image, result)
            background_tasks.add_task(remove_quietly, result["dicom_seg"])
        return send_response(instance.datastore(), result, output, background_tasks)

    def _dicom_seg(instance, image: str, result) -> str:
        datastore = instance.datastore()
        if not hasattr(datastore, "dicom_seg"):
            raise HTTPException(422, "output=dicom_seg needs a DICOMweb datastore (--studies http(s)://.../dicom-web)")
        params = result.get("params") or {}
        names = [{"name": n, "idx": v} for n, v in (params.get("label_names") or {}).items()]
        try:
            return datastore.dicom_seg(image, result.get("file") or result.get("label"), {"label_info": names},
                                       f"AdaptSAM {params.get('model', '').replace('/', ' ')}".strip())
        except RequestError as e:
            raise HTTPException(e.status_code, str(e))

    @router.post("/train/{model}")
    async def train(model: str, params: Optional[dict] = None, run_sync: bool = False, enqueue: bool = False, user=admin_role):
        from monailabel.endpoints.train import run_model

        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        try:
            instance.check_train_request(model, params or {})
        except ValueError as e:
            raise HTTPException(422, str(e))
        return await run_in_threadpool(run_model, model, params, run_sync, enqueue)

    @router.put("/model/{model}")
    async def upload_weights(model: str, user=admin_role):
        """MONAI Label's weight upload has nowhere to write here (it answered 500): adapters are
        published by training through the gate, or by hand from a kept candidate."""
        raise HTTPException(405, "weights are not uploaded here: train (POST /train/{model}) or publish a kept "
                                 "candidate (POST /adaptsam/candidates/{model}/publish)")

    @router.post("/adaptsam/serve/{model}")
    async def serve_version(model: str, version: str = "latest", user=admin_role):
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        if not (version in ("latest", "base") or version.isdigit() or (version[:1] == "c" and version[1:].isdigit())):
            raise HTTPException(422, "version must be a published version number, a candidate (cN), 'base' (no adapters) or 'latest'")
        try:
            return await run_in_threadpool(instance.serve_version, model, version)
        except FileNotFoundError as e:
            raise HTTPException(404, str(e))

    @router.get("/adaptsam/candidates/{model}")
    async def candidates(model: str, user=user_role):
        """Training results the publish gate kept back, with why."""
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        return instance.candidates(model)

    @router.post("/adaptsam/candidates/{model}/publish")
    async def publish_candidate(model: str, candidate: str, user=admin_role):
        """Override the gate: publish a kept candidate as the next version (logged)."""
        instance = app_getter()
        if model not in instance.model_names():
            raise HTTPException(404, f"unknown model {model!r}; available: {instance.model_names()}")
        try:
            return await run_in_threadpool(instance.publish_candidate, model, candidate, getattr(user, "username", ""))
        except FileNotFoundError as e:
            raise HTTPException(404, str(e))

    @router.get("/adaptsam/progress")
    async def progress(user=user_role):
        return app_getter().adaptsam_status()

    return router


def token_login_router(token: str) -> APIRouter:
    """What Slicer's MONAI Label module asks before it logs in (`GET /auth/`, then `POST
    /auth/token` with a user name and password): in token mode the password is the API token,
    and the answer is that token as a bearer token."""
    from fastapi.security import OAuth2PasswordRequestForm

    router = APIRouter(prefix="/auth", tags=["Auth"])

    @router.get("/")
    async def auth_enabled():
        return {"enabled": True, "client_id": "adaptsam", "realm": "token"}

    @router.post("/token")
    async def access_token(form: OAuth2PasswordRequestForm = Depends()):
        if not hmac.compare_digest(form.password.encode(), token.encode()):
            raise HTTPException(401, "wrong API token", headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": token, "token_type": "Bearer"}

    @router.get("/token/valid")
    async def valid_token():  # the guard already checked the bearer token
        return {"username": "token", "roles": ["admin"]}

    return router


def install(fastapi_app, app_getter, prefix: str = "", token: str = "", max_upload: int = 1 << 30) -> None:
    """Add our routes *in front of* the stock ones so they win the match."""
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC

    routes = fastapi_app.router.routes
    n = len(routes)
    fastapi_app.include_router(build_router(app_getter, max_upload), prefix=prefix)
    roles = [Depends(RBAC(getattr(settings, f"MONAI_LABEL_AUTH_ROLE_{r}"))) for r in ("USER", "ANNOTATOR", "ADMIN")]
    fastapi_app.include_router(datastore_routes.build_router(app_getter, *(r.dependency for r in roles), max_upload), prefix=prefix)
    if token:
        fastapi_app.include_router(token_login_router(token), prefix=prefix)
    ours = routes[n:]
    del routes[n:]
    routes[0:0] = ours
    fastapi_app.openapi_schema = None
