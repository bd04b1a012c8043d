"""AdaptSAM Label: the MONAI Label app. Wiring only; the work lives in the `adaptsam` library."""

from adaptsam.app import AdaptSamAppBase
from monailabel.interfaces.app import MONAILabelApp


# MONAI Label picks the first class in this file whose *direct* base is named MONAILabelApp.
class AdaptSamApp(AdaptSamAppBase, MONAILabelApp):
    pass
