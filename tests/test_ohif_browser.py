"""OHIF in a real browser: Orthanc with the sample CT, the server on it, headless Chromium
(Debian package `chromium`) driven by puppeteer-core (tests/e2e/ohif_check.mjs).

The viewer opens the study in the MONAI Label mode; a point on the liver, clicked with the mouse
after the panel was connected and "liver" picked in its Point Prompts tab, runs the model through
the panel's own request; the answer must be drawn on the axial viewport (pixels of a screenshot,
compared with one taken before the click, and where the liver is); what the viewer then holds is
saved as the final label with this project's save request, sent from the page (OHIF 0.8.5's panel
has no save button): the server stores a DICOM SEG in Orthanc, which must decode to exactly the
viewer's labelmap and appear in the study's series list once the study is opened again.

Screenshots and result.json: tests/artifacts/ohif/ (printed by the test). Needs Chromium, node
and tests/e2e/node_modules (`npm ci` is run here when it is missing): a missing tool fails the
test with the command that installs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import requests
from PIL import Image
from scipy import ndimage

import pacs
import samples
from adaptsam.engine.metrics import largest_slice
from server_util import REPO, server_process, shipped

E2E = REPO / "tests" / "e2e"
SCRIPT = E2E / "ohif_check.mjs"
ARTIFACTS = REPO / "tests" / "artifacts" / "ohif"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL_CHROMIUM = "apt-get install -y --no-install-recommends chromium"
INSTALL_NODE = "apt-get install -y --no-install-recommends nodejs npm"
INSTALL_PUPPETEER = f"cd {E2E.relative_to(REPO)} && npm ci --no-audit --no-fund"
TOKEN = "ohif-browser-token"  # the server runs with an API token: OHIF logs in by link (cookie)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BROWSER_BUDGET_S = 120  # the browser part: open, connect, click, infer, draw, save, reopen
RUN_TIMEOUT_S = 170  # kill the browser script past this


@pytest.fixture(scope="module")
def browser_tools():
    """node and puppeteer-core (installed from tests/e2e/package-lock.json if missing) and
    Chromium; checked before Orthanc and the server are started."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `{INSTALL_CHROMIUM}` (as root)")
    node = shutil.which("node")
    if not node:
        pytest.fail(f"node is not installed: run `{INSTALL_NODE}` (as root)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(re.sub(r"^v", "", version).split(".")[0] or 0) < 18:
        pytest.fail(f"node {version} is too old for puppeteer-core (needs 18 or newer): run `{INSTALL_NODE}` (as root)")
    if not (E2E / "node_modules" / "puppeteer-core" / "package.json").is_file():
        npm = shutil.which("npm")
        if not npm:
            pytest.fail(f"npm is not installed: run `{INSTALL_NODE}` (as root), then `{INSTALL_PUPPETEER}`")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=E2E, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not (E2E / "node_modules" / "puppeteer-core").is_dir():
            pytest.fail(f"`npm ci` in {E2E} failed (rc {done.returncode}); run `{INSTALL_PUPPETEER}`:\n{done.stderr[-2000:]}")
    return node


@pytest.fixture(scope="module")
def server(browser_tools, orthanc, tmp_path_factory):
    url, series, root = orthanc
    weights = tmp_path_factory.mktemp("weights-ohif")
    shutil.copy2(shipped()[1], weights)
    # OHIF's point request names no mode, so the server's default applies: one slice here (with
    # propagation every slice of the CT would be segmented on the CPU, minutes on a small machine)
    conf = {"auto_train_every": "0", "weights_dir": str(weights), "propagate": "false"}
    env = {**pacs.server_env(url, root / "cache"), "ADAPTSAM_API_TOKEN": TOKEN}
    with server_process(url, conf=conf, log=root / "server.log", env=env, headers=AUTH) as (server_url, _):
        yield server_url, url, series, root / "server.log"


def liver(samples_dir) -> np.ndarray:
    return samples.structure_mask(samples_dir, "ct_dicom", "liver")


def click_on(mask: np.ndarray):
    """[i, j, k]: the point of the largest liver slice farthest from the liver's edge."""
    k = largest_slice(mask)
    depth = ndimage.distance_transform_edt(mask[:, :, k])
    i, j = np.unravel_index(int(depth.argmax()), depth.shape)
    return [int(i), int(j), int(k)]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_browser(node, server_url, study, series, click, out: Path, server_log: Path):
    out.mkdir(parents=True, exist_ok=True)
    cmd = [node, str(SCRIPT), server_url, study, series, ",".join(map(str, click)), str(out), TOKEN]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=E2E)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser check ran past {RUN_TIMEOUT_S} s; screenshots so far in {out}\n{(e.stderr or b'')[-3000:]!r}\n"
                    f"server log:\n{tail(server_log)}")
    seconds = time.monotonic() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        pytest.fail(f"no result from {' '.join(cmd)} (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n"
                    f"server log:\n{tail(server_log)}")
    result = json.loads(lines[-1])
    if not result.get("ok"):
        pytest.fail(f"the browser check failed at step {result.get('step')!r}: {result.get('error')}\n"
                    f"screenshots and result.json in {out}\nstderr: {done.stderr[-2000:]}\nserver log:\n{tail(server_log)}")
    return result, seconds


def overlay_pixels(before: np.ndarray, after: np.ndarray, colour) -> np.ndarray:
    """Pixels the segmentation colour was blended into: the change from `before` points toward
    the colour (liver: a salmon red, so red up against blue), by a clear margin. The CT under it
    is grey (R = G = B), so grey-level changes cannot pass."""
    b, a = before.astype(np.int32), after.astype(np.int32)
    c = np.asarray(colour[:3], np.int32)
    change = a - b
    toward = np.sign(c[0] - c[2])  # the colour's red-minus-blue direction
    red_minus_blue = (change[..., 0] - change[..., 2]) * toward
    return (red_minus_blue >= 12) & (np.abs(change).sum(axis=-1) >= 15)


def tinted(image: np.ndarray, colour) -> np.ndarray:
    """Pixels clearly off grey toward the colour (red above blue for the liver's salmon)."""
    c = np.asarray(colour[:3], np.int32)
    img = image.astype(np.int32)
    return (img[..., 0] - img[..., 2]) * np.sign(c[0] - c[2]) >= 12


def project(mask2d: np.ndarray, projection, rect) -> np.ndarray:
    """A voxel mask of one axial slice drawn onto the pixels of the screenshot cropped to `rect`
    (x, y, width, height), nearest voxel per pixel."""
    o, di, dj = (np.asarray(projection[k], float) for k in ("origin", "di", "dj"))
    x, y, w, h = rect
    o = o - (x, y)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    m = np.linalg.inv(np.array([[di[0], dj[0]], [di[1], dj[1]]]))
    rel = np.stack([xs - o[0], ys - o[1]], axis=-1) @ m.T
    i, j = np.floor(rel[..., 0] + 0.5).astype(int), np.floor(rel[..., 1] + 0.5).astype(int)
    inside = (i >= 0) & (i < mask2d.shape[0]) & (j >= 0) & (j < mask2d.shape[1])
    out = np.zeros((h, w), bool)
    out[inside] = mask2d[i[inside], j[inside]]
    return out


def seg_of(dicomweb: str, referenced: str):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=dicomweb)
    for s in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, uid = s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]
        instance = client.retrieve_series(study, uid)[0]
        if str(instance.ReferencedSeriesSequence[0].SeriesInstanceUID) == referenced:
            return instance
    return None


def seg_on_grid(seg, reference_nifti: Path) -> np.ndarray:
    import pydicom_seg
    import SimpleITK as sitk

    image = pydicom_seg.MultiClassReader().read(seg).image
    image = sitk.Resample(image, sitk.ReadImage(str(reference_nifti)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def test_a_point_in_ohif_draws_the_liver_and_the_saved_seg_appears_in_the_series_list(browser_tools, server, samples_dir, tmp_path):
    url, dicomweb, series, log = server
    study, ct = series["ct_dicom"]["study"], series["ct_dicom"]["series"]
    truth = liver(samples_dir)
    click = click_on(truth)
    k = click[2]
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    print(f"\nOHIF browser check: screenshots and result.json in {ARTIFACTS}")
    r, seconds = run_browser(browser_tools, url, study, ct, click, ARTIFACTS, log)
    print(f"browser part {seconds:.1f} s; steps (s from start): {r['timings_s']}; infer {r['infer']['seconds']} s")

    # the server wants its token: the page logged in by link (redirect + cookie) and every later
    # request of the viewer and its panel passed (no 401 below); without it the server refuses
    assert r["login"]["status"] == 200 and r["login"]["redirected"] == 1 and "token=" not in r["login"]["url"], r["login"]
    assert requests.get(f"{url}/ohif/", timeout=30).status_code == 401 and requests.get(f"{url}/info/", timeout=30).status_code == 401

    # the study in the MONAI Label mode: its route, its three MPR viewports on the CT, its panel
    mode = r["mode"]
    assert mode["route"] == "/ohif/monai-label" and mode["panel"] and mode["server_input"], mode
    assert mode["viewports"] == ["mpr-axial", "mpr-coronal", "mpr-sagittal"], mode
    assert all(shown == [ct] for shown in mode["viewport_series"].values()) and len(mode["viewport_series"]) == 3, mode
    assert r["series_list_before"] and not any(t.startswith("SEG") for t in r["series_list_before"]), r["series_list_before"]
    assert r["info_status"] == 200

    # the mouse click became the panel's point, and the panel's request carried it
    assert r["probe"]["active_primary_tool"] == "ProbeMONAILabel", r["probe"]
    assert r["probe_points"] == [click], (r["probe_points"], click)
    infer = r["infer"]
    assert infer["status"] == 200, infer
    q = parse_qs(urlparse(infer["url"]).query)
    assert urlparse(infer["url"]).path == "/infer/adaptsam" and q["image"] == [ct] and q["output"] == ["image"], infer["url"]
    assert infer["params"]["foreground"] == [click] and infer["params"]["background"] == [], infer["params"]
    assert infer["params"]["result_extension"] == ".nrrd"

    # the answer is in the viewer's labelmap, as the liver segment, on the clicked slice only
    lm = r["labelmap"]
    assert list(lm["counts"]) == [str(lm["segment_index"])], lm
    voxels = lm["counts"][str(lm["segment_index"])]
    assert voxels > 1000 and lm["voxels_on_click_slice"] == voxels, lm

    # ... and drawn: pixels of the axial viewport that took the liver colour, against the
    # screenshot taken before the click
    x, y, w, h = (int(round(r["axial_rect"][key])) for key in ("x", "y", "width", "height"))
    crop = lambda name: np.asarray(Image.open(r["screenshots"][name]).convert("RGB"))[y:y + h, x:x + w]  # noqa: E731
    before, after = crop("03-before-click"), crop("05-after-infer")
    drawn = overlay_pixels(before, after, lm["color"])
    # the notification toast (bottom right) is not the viewport's image
    drawn[int(h * 0.85):, int(w * 0.75):] = False
    scale = abs(np.linalg.det(np.array([r["projection"]["di"], r["projection"]["dj"]])))  # screen pixels per voxel
    liver_px = project(truth[:, :, k], r["projection"], (x, y, w, h))
    near_liver = ndimage.binary_dilation(liver_px, iterations=max(2, int(round(3 * np.sqrt(scale)))))
    n = int(drawn.sum())
    tinted_before = int(tinted(before, lm["color"]).sum())
    print(f"overlay: {n} pixels drawn ({voxels} voxels, {scale:.2f} screen pixels each), "
          f"{n and drawn[near_liver].sum() / n:.3f} of them on the liver; liver-tinted pixels before the click "
          f"{tinted_before}, after {int(tinted(after, lm['color']).sum())}")
    assert tinted_before <= 0.01 * max(n, 1), f"{tinted_before} liver-tinted pixels before the click"
    assert n >= 0.5 * voxels * scale, f"only {n} overlay pixels for {voxels} voxels of {scale:.2f} screen pixels each"
    assert drawn[near_liver].sum() >= 0.9 * n, "the overlay is not where the liver is"
    assert drawn[liver_px].sum() >= 0.3 * liver_px.sum(), "the overlay covers little of the liver"

    # saved: the request answered, and the SEG in Orthanc is the viewer's labelmap voxel for voxel
    save = r["save"]
    assert save["status"] == 200 and save["response"]["image"] == ct, save
    assert save["response"].get("prompts_recorded") is True, save  # the save found OHIF's session
    assert save["voxels"] == voxels and save["index_sum"] == lm["index_sum"], (save, lm)
    seg = seg_of(dicomweb, ct)
    assert seg is not None, "no SEG referencing the CT in Orthanc"
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    reference = tmp_path / "ct.nii.gz"
    reference.write_bytes(requests.get(f"{url}/datastore/image", params={"image": ct}, headers=AUTH, timeout=300).content)
    stored = seg_on_grid(seg, reference)
    nz = np.flatnonzero(stored.ravel(order="F"))
    assert len(nz) == voxels and int(nz.sum()) == lm["index_sum"], "the SEG is not the viewer's labelmap"
    saved_k = stored[:, :, k] > 0
    precision = (saved_k & truth[:, :, k]).sum() / saved_k.sum()
    assert precision >= 0.9, f"only {precision:.2f} of the saved mask is liver"
    # the drawn overlay is the saved mask's place on screen
    saved_px = project(saved_k, r["projection"], (x, y, w, h))
    iou = (drawn & saved_px).sum() / (drawn | saved_px).sum()
    print(f"saved mask: {saved_k.sum()} voxels on slice {k}, {precision:.3f} liver; overlay vs saved mask IoU {iou:.3f}")
    assert iou >= 0.7, f"the overlay and the saved mask differ on screen (IoU {iou:.2f})"

    # the study opened again lists the SEG, which references the CT
    after_list = r["series_list_after"]
    assert any(t.startswith("SEG") for t in after_list) and any(t.startswith("CT") for t in after_list), after_list
    segs = [d for d in r["display_sets_after"] if d["modality"] == "SEG"]
    assert len(segs) == 1 and segs[0]["series"] == str(seg.SeriesInstanceUID) and segs[0]["referenced_series"] == ct, segs

    # nothing failed on the way (Google fonts are out of reach here; OHIF asks for an icon
    # that is not shipped; MONAI Label answers 404 to "is a training running" when none is)
    harmless = ("fonts.googleapis.com", "android-chrome-", "/train/?check_if_running=true")
    errors = [e for e in r["http_errors"] if not any(s in e for s in harmless)]
    assert not errors, errors
    assert r["timings_s"]["total"] < BROWSER_BUDGET_S, r["timings_s"]
