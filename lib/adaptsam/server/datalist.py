"""Labelled cases of a datastore (a studies folder or a DICOMweb PACS), for the evaluation and
the publish gate: each image with a `final` label, its structures named from the label info."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from ..evaluation.runner import Case


def structure_names(info: Dict) -> Dict[int, str]:
    """Label value -> structure name, from what Slicer and OHIF send with a saved label
    (`label_info`: [{"name", "idx"}]; idx missing: position + 1)."""
    names: Dict[int, str] = {}
    for pos, entry in enumerate(info.get("label_info") or [], 1):
        if isinstance(entry, dict) and entry.get("name"):
            try:
                names[int(entry.get("idx", pos))] = str(entry["name"])
            except (TypeError, ValueError):
                continue
    return names


def image_id_of(path: str) -> str:
    """The datastore's id of an image file: its name without the datastore extension (a DICOM
    series' id is its UID, dots and all)."""
    from monailabel.config import settings

    name = Path(path).name
    for ext in sorted((e.lstrip("*") for e in settings.MONAI_LABEL_DATASTORE_FILE_EXT), key=len, reverse=True):
        if ext and name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def labelled_cases(datastore: Datastore, image_ids: Optional[List[str]] = None) -> List[Case]:
    cases = []
    for item in datastore.datalist():
        image_id = image_id_of(item["image"])
        if image_ids and image_id not in image_ids:
            continue
        info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL.value) or {}
        cases.append(Case(image_id, item["image"], item["label"], structure_names(info)))
    return sorted(cases, key=lambda c: c.image_id)


def open_datastore(studies: str, cache: Optional[str] = None) -> Datastore:
    """The datastore `monailabel start_server --studies <studies>` would serve: a folder, or a
    DICOMweb PACS (series and SEGs downloaded into `cache`, MONAI Label's default when None)."""
    if studies.startswith(("http://", "https://")):
        from .dicomweb import SiteDICOMwebDatastore

        return SiteDICOMwebDatastore(studies.rstrip("/"), cache_path=cache)
    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
