"""AdaptSAM Label: the MONAI Label app. Wiring only; the work lives in the `adaptsam` library."""

from pathlib import Path

from adaptsam.server.app import AdaptSamAppBase
from monailabel.interfaces.app import MONAILabelApp

# base checkpoints and published adapters: the repository's model_weights/ (--conf weights_dir overrides)
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "model_weights"


# MONAI Label picks the first class in this file whose *direct* base is named MONAILabelApp.
class AdaptSamApp(AdaptSamAppBase, MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        super().__init__(app_dir, studies, conf, weights_dir=str(WEIGHTS_DIR))
