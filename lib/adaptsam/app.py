"""MONAI Label glue for the app in apps/adaptsam/main.py.

The app class there is `class AdaptSamApp(AdaptSamAppBase, MONAILabelApp)`: MONAI Label only
finds app classes whose direct base is named MONAILabelApp, so the behaviour lives in this mixin.
MONAI Label rebuilds the whole app in every background job (training, scoring), so
construction stays cheap: models and the embedding cache are created on first use.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional

from .config import AppConfig
from .engine.interactive import InteractiveSegmenter, Runtime
from .engine.models import ModelHandle
from .infers.adaptsam_infer import AdaptSamInfer

logger = logging.getLogger(__name__)

MODELS = {"adaptsam": "2d", "adaptsam_3d": "3d"}


class AdaptSamAppBase:
    def __init__(self, app_dir, studies, conf):
        self.config = AppConfig.from_conf(conf or {})
        self._runtime: Optional[Runtime] = None
        self._segmenters: Dict[str, InteractiveSegmenter] = {}
        self._runtime_lock = threading.Lock()
        logger.info("AdaptSAM config: %s", self.config)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="AdaptSAM Label",
            description="Interactive segmentation with an adapted Segment Anything model "
            "(box, click and mask prompts; adapters retrained on saved corrections)",
            version="0.1.0",
        )

    # ---- models -----------------------------------------------------------------------------

    def segmenter(self, kind: str) -> InteractiveSegmenter:
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = Runtime(self.config.cache_bytes)
            if kind not in self._segmenters:
                pinned = self.config.adapter_2d if kind == "2d" else self.config.adapter_3d
                handle = ModelHandle(
                    kind, self.config.backbone, self.config.weights_dir, self.config.resolved_device(),
                    pinned=pinned, num_slices=self.config.num_slices,
                )
                self._segmenters[kind] = InteractiveSegmenter(self._runtime, handle, propagate=self.config.propagate)
            return self._segmenters[kind]

    def init_infers(self):
        return {
            name: AdaptSamInfer(kind, list(self.config.labels), lambda kind=kind: self.segmenter(kind), self.config.propagate)
            for name, kind in MODELS.items()
        }

    # ---- status ------------------------------------------------------------------------------

    def adaptsam_status(self) -> Dict:
        rt = self._runtime
        return {
            "backbone": self.config.backbone,
            "device": self.config.resolved_device(),
            "encoding": rt.encoder.progress() if rt else [],
            "cache": rt.cache.stats() if rt else {},
            "sessions": len(rt.sessions) if rt else 0,
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

        from . import routes

        routes.install(fastapi_app, app_instance, prefix=settings.MONAI_LABEL_API_STR)
        logger.info("AdaptSAM routes installed (threaded /infer, /adaptsam/progress)")
