"""MONAI Label glue for the app in apps/adaptsam/main.py.

The app class there is `class AdaptSamApp(AdaptSamAppBase, MONAILabelApp)`: MONAI Label only
finds app classes whose direct base is named MONAILabelApp, so the behaviour lives in this mixin.
MONAI Label rebuilds the whole app in every background job (training, scoring), so
construction stays cheap: models and the embedding cache are created on first use.

What the routes (routes.py) need from the app is the small interface at the end of this class:
`model_names`, `infer`, `serve_version`, `adaptsam_status`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from ..engine.allocator import keep_freed_memory
from ..engine.encoder_engines import OpenVinoEncoders, default_precision
from ..engine.encoder_engines import resolve as resolve_engine
from ..engine.interactive import InteractiveSegmenter, Runtime
from ..engine.models import CANDIDATES, ModelHandle
from ..training import gate
from ..training.options import TrainOptions
from . import routes, security
from .config import AppConfig
from .infer_task import AdaptSamInfer
from .strategies import PromptDisagreement
from .train_task import PROMPTS_KEY, AdaptSamTrainTask

logger = logging.getLogger(__name__)

# Before any worker thread has its own malloc arena: the server process (and MONAI Label's
# training and scoring jobs, which load this app too) then keeps and reuses freed memory.
keep_freed_memory()

MODELS = {"adaptsam": "2d", "adaptsam_3d": "3d"}
RECENT_SESSION_S = 1800  # a save this long after the last infer still counts as "right after"


class AdaptSamAppBase:
    def __init__(self, app_dir, studies, conf, weights_dir):
        self.config = AppConfig.from_conf(conf or {}, default_weights_dir=weights_dir)
        self._runtime: Optional[Runtime] = None
        self._converted: Optional[OpenVinoEncoders] = None
        self._segmenters: Dict[str, InteractiveSegmenter] = {}
        self._runtime_lock = threading.Lock()
        self._auto_lock = threading.Lock()
        logger.info("AdaptSAM config: %s", self.config)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="AdaptSAM Label",
            description="Interactive segmentation with an adapted Segment Anything model "
            "(box, click and mask prompts; adapters retrained on saved corrections)",
            version="0.2.0",
        )

    # ---- models -----------------------------------------------------------------------------

    def segmenter(self, kind: str) -> InteractiveSegmenter:
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = Runtime(self.config.cache_bytes, self.config.session_bytes)
                self._converted = OpenVinoEncoders(precision=default_precision())
            if kind not in self._segmenters:
                pinned = self.config.adapter_2d if kind == "2d" else self.config.adapter_3d
                device = self.config.resolved_device()
                handle = ModelHandle(kind, self.config.backbone, self.config.weights_dir, device, pinned=pinned,
                                     engine=resolve_engine(self.config.engine, device), converted=self._converted)
                self._segmenters[kind] = InteractiveSegmenter(self._runtime, handle, propagate=self.config.propagate)
            return self._segmenters[kind]

    def init_infers(self):
        return {
            name: AdaptSamInfer(kind, list(self.config.labels), lambda kind=kind: self.segmenter(kind), self.config.propagate)
            for name, kind in MODELS.items()
        }

    def init_trainers(self):
        device = self.config.resolved_device()
        trainers = {}
        for name, kind in MODELS.items():
            task = AdaptSamTrainTask(kind, self.config.weights_dir, self.config.backbone, device)
            task.defaults = dict(self.config.train_defaults)
            trainers[name] = task
        self.train_tasks = trainers
        return trainers

    def init_strategies(self):
        return {
            "random": Random(),
            "first": First(),
            "uncertainty": PromptDisagreement(lambda: self.segmenter("2d")),
        }

    # ---- datastore ---------------------------------------------------------------------------

    def init_remote_datastore(self):
        """A DICOMweb PACS (`--studies http(s)://host/dicom-web`) with clinical defaults (dicomweb.py)."""
        from monailabel.config import settings

        from .dicomweb import SiteDICOMwebDatastore, check_dcmqi

        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        check_dcmqi()
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        return SiteDICOMwebDatastore(self.studies, cache_path=cache, provenance=self.label_provenance)

    def label_provenance(self, image_id: str, info: Dict) -> Dict:
        """What produced a label being saved: the model of the saving client's last session on it."""
        client = info.get("client_id")
        session = self._runtime.sessions.latest(str(client), image_id) if client and self._runtime else None
        model = (session.prompts.get("model") if session else "") or ""
        return {"model": f"AdaptSAM {model.replace('/', ' ')}".strip()}

    # ---- saved labels: prompts and the auto-trigger -------------------------------------------

    def on_save_label(self, image_id, label_id):
        result = super().on_save_label(image_id, label_id) or {}
        datastore = self.datastore()
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL.value) or {}
        client = info.get("client_id")
        if client and self._runtime is not None:
            session = self._runtime.sessions.latest(str(client), image_id)
            if session is not None and time.time() - session.updated < RECENT_SESSION_S:
                datastore.update_label_info(label_id, DefaultLabelTag.FINAL.value, {PROMPTS_KEY: [session.prompts]})
                result["prompts_recorded"] = True
        is_final = bool(datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value))
        trigger = self._maybe_auto_train() if is_final else None
        if trigger:
            result["auto_train"] = trigger
        return result

    def _auto_state_path(self) -> Path:
        return Path(self.config.weights_dir) / "auto_train_state.json"

    def _maybe_auto_train(self) -> Optional[str]:
        """Start `auto_train_models` once `auto_train_every` final labels were saved since the
        last run. While a run is in progress MONAI Label refuses another one; the count is kept
        and the next save after the run starts it."""
        every = self.config.auto_train_every
        if every <= 0:
            return None
        with self._auto_lock:
            path = self._auto_state_path()
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = {"saves_since_last_run": 0, "runs": 0}
            state["saves_since_last_run"] += 1
            outcome = None
            due = state["saves_since_last_run"] >= every
            waiting = self._gate_cannot_measure_yet() if due else None
            if waiting:
                outcome = waiting  # the count is kept: the next save starts the run
            elif due:
                started = [m for m in self.config.auto_train_models if self.async_training(m, params=None, enqueue=False)]
                if started:
                    state.update(saves_since_last_run=0, runs=state["runs"] + 1, ts=time.time(), models=started)
                    outcome = "started " + ",".join(started)
                    logger.info("auto-train started for %s", started)
                else:
                    outcome = "skipped: training already running"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(state))
            return outcome

    def _gate_cannot_measure_yet(self) -> Optional[str]:
        """Why an automatic run now could publish nothing: the publish gate measures a candidate
        on saved labels it did not train on, so it needs two; a run before that would spend its
        15 minutes of the workstation's cores on a result that is thrown away."""
        options = TrainOptions.from_request(dict(self.config.train_defaults), "2d")
        if options.publish != "gate" or options.val_split <= 0:
            return None
        saved = len(self.datastore().get_labeled_images())
        if saved >= gate.MIN_LABELS:
            return None
        return f"waiting: the publish gate needs {gate.MIN_LABELS} saved labels (one held out to measure the result), {saved} so far"

    # ---- what the routes use ------------------------------------------------------------------

    def model_names(self) -> List[str]:
        return list(MODELS)

    def serve_version(self, model: str, version: str) -> Dict:
        """Rollback: pin the adapter version `model` serves ("latest" follows new publications)."""
        handle = self.segmenter(MODELS[model]).handle
        handle.pin(version)
        serving = handle.current()
        return {"model": model, "pinned": handle.pinned or "latest", "serving_version": serving.version}

    def check_train_request(self, model: str, params: Dict) -> None:
        """Refuse (ValueError) a train request whose options would fail in the training process."""
        TrainOptions.from_request({**self.train_tasks[model].config(), **params}, MODELS[model])

    def candidates(self, model: str) -> List[Dict]:
        return gate.list_candidates(Path(self.config.weights_dir), MODELS[model], self.config.backbone)

    def publish_candidate(self, model: str, candidate: str, user: str = "") -> Dict:
        """The manual override of the publish gate: serve a kept candidate as the next version."""
        path = Path(self.config.weights_dir) / CANDIDATES / f"adaptsam_{MODELS[model]}_{self.config.backbone}_{candidate}.pt"
        if not (candidate[:1] == "c" and candidate[1:].isdigit()) or not path.is_file():
            raise FileNotFoundError(f"no {model} candidate {candidate!r}")
        published = gate.publish_candidate(path, Path(self.config.weights_dir), f"published by hand over the gate{f' by {user}' if user else ''}")
        logger.warning("publish gate overridden: %s candidate %s published as %s", model, candidate, published.name)
        return {"model": model, "candidate": candidate, "published": published.name}

    def adaptsam_status(self) -> Dict:
        rt = self._runtime
        return {
            "backbone": self.config.backbone,
            "device": self.config.resolved_device(),
            "served": {kind: seg.handle.status() for kind, seg in self._segmenters.items()},
            "encoding": rt.encoder.progress() if rt else [],
            "cache": rt.cache.stats() if rt else {},
            "engine_conversions": self._converted.status() if rt else {},
            "sessions": rt.sessions.stats() if rt else {},
        }

    def info(self):
        meta = super().info()
        meta["adaptsam"] = self.adaptsam_status()
        return meta

    def on_init_complete(self):
        super().on_init_complete()
        from monailabel.app import app as fastapi_app
        from monailabel.config import settings
        from monailabel.interfaces.utils.app import app_instance

        token = security.configured_token()
        routes.install(fastapi_app, app_instance, prefix=settings.MONAI_LABEL_API_STR, token=token,
                       max_upload=self.config.max_upload_bytes)
        # the login itself, and OHIF's web-app manifest (public metadata browsers fetch without cookies)
        open_paths = [settings.MONAI_LABEL_API_STR + p for p in ("/auth/", "/auth/token", "/ohif/manifest.json")] if token else []
        security.install(fastapi_app, token, self.config.max_upload_bytes, self.config.cors_origins, open_paths)
        logger.info("AdaptSAM routes installed; API token %s; CORS origins %s", "required" if token else "off",
                    list(self.config.cors_origins) or "none (same origin only)")
        if resolve_engine(self.config.engine, self.config.resolved_device()) != "torch":
            # convert the served encoders now, not at the first click (torch answers meanwhile)
            threading.Thread(target=lambda: [self.segmenter(k).handle.current() for k in MODELS.values()],
                             name="adaptsam-engine-warmup", daemon=True).start()
