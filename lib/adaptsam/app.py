"""MONAI Label glue for the app in apps/adaptsam/main.py.

The app class there is `class AdaptSamApp(AdaptSamAppBase, MONAILabelApp)`: MONAI Label only
finds app classes whose direct base is named MONAILabelApp, so the behaviour lives in this mixin.
MONAI Label rebuilds the whole app in every background job (training, scoring), so
construction stays cheap: models load lazily on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import AppConfig

logger = logging.getLogger(__name__)


class AdaptSamAppBase:
    def __init__(self, app_dir, studies, conf):
        self.config = AppConfig.from_conf(conf or {})
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
