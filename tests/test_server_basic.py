"""The app loads in a real `monailabel start_server` process and answers /info through the Slicer client."""

from monailabel.client import MONAILabelClient

from server_util import copy_studies, running_server


def test_server_starts_and_answers_info(samples_dir, tmp_path):
    studies = copy_studies(samples_dir, tmp_path / "studies")
    with running_server(studies) as url:
        info = MONAILabelClient(url).info()
    assert info["name"] == "AdaptSAM Label"
    assert info["datastore"]["total"] == len(list(studies.glob("*.nii.gz")))
