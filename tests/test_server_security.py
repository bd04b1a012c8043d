"""Hardening through a real server process on loopback, with an API token set: no request
reads, writes or deletes a file outside the datastore; every route needs the token (MONAI
Label's client, as Slicer uses it, and a browser's cookie login work); a broken label is never
stored; bad input is a 4xx, never a 500; temp files go; a killed server leaves no trainer and
loses no saved label."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

import samples
from server_util import APP_DIR, copy_studies, server_process

IMAGE = "mr_3mm"
TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "http://viewer.example:3000"


def tree(root: Path):
    """Every file under `root` with its content hash (what an attack could change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    studies = copy_studies(samples_dir, root / "studies", image_ids={IMAGE, "ct_3mm"})
    (root / "outside.nii.gz").write_bytes(samples.image_path(samples_dir, IMAGE).read_bytes())
    (root / "tmp").mkdir()
    conf = {"auto_train_every": "0", "cors_origins": ORIGIN, "max_upload_mb": "32"}
    env = {"ADAPTSAM_API_TOKEN": TOKEN, "TMPDIR": str(root / "tmp")}
    with server_process(studies, conf=conf, log=root / "server.log", env=env, headers=AUTH) as (url, _):
        yield url, root, studies


def call(method, url, path, **kw):
    kw.setdefault("timeout", 120)
    headers = {**AUTH, **kw.pop("headers", {})}
    return requests.request(method, url + path, headers=headers, **kw)


def nifti_bytes(array, affine) -> bytes:
    path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    nib.save(nib.Nifti1Image(array, affine), path)
    data = Path(path).read_bytes()
    os.unlink(path)
    return data


def test_every_route_needs_the_token(server):
    url, _, _ = server
    anonymous = [("GET", "/info/"), ("GET", "/datastore/?output=all"), ("GET", f"/datastore/image?image={IMAGE}"),
                 ("POST", f"/infer/adaptsam?image={IMAGE}"), ("GET", "/adaptsam/progress"),
                 ("POST", "/adaptsam/serve/adaptsam?version=latest"), ("GET", "/adaptsam/candidates/adaptsam"),
                 ("GET", "/ohif/"), ("GET", "/train/"), ("POST", "/train/adaptsam"), ("DELETE", f"/datastore/image?id={IMAGE}"),
                 ("POST", "/activelearning/random"), ("GET", "/logs/"), ("GET", "/docs"), ("GET", "/openapi.json")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Cookie": "adaptsam_token=wrong"}):
        for method, path in anonymous:
            r = requests.request(method, url + path, headers=headers, timeout=60)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
    assert call("GET", url, "/info/").status_code == 200
    assert call("GET", url, "/adaptsam/progress").status_code == 200
    assert call("GET", url, "/datastore/?output=all").json()["objects"].keys() >= {IMAGE}


def test_slicer_logs_in_with_the_token_as_password(server):
    url, _, _ = server
    client = MONAILabelClient(url, tmpdir=tempfile.mkdtemp(), client_id="slicer")
    with pytest.raises(MONAILabelClientException):
        client.info()
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException):
        client.auth_token("radiologist", "not the token")
    client.update_auth(client.auth_token("radiologist", TOKEN))
    assert client.auth_valid_token()
    assert set(client.info()["models"]) >= {"adaptsam", "adaptsam_3d"}


def test_a_browser_logs_in_once_by_link_and_then_uses_a_cookie(server):
    url, _, _ = server
    browser = requests.Session()
    r = browser.get(f"{url}/ohif/?token=wrong", allow_redirects=False, timeout=30)
    assert r.status_code == 401 and not browser.cookies
    r = browser.get(f"{url}/ohif/?token={TOKEN}&StudyInstanceUIDs=1.2.3", allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"].endswith("/ohif/?StudyInstanceUIDs=1.2.3")
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
    assert browser.get(f"{url}/ohif/", timeout=30).status_code == 200  # the viewer's page and its API calls
    assert browser.get(f"{url}/info/", timeout=30).status_code == 200


def test_cors_allows_only_the_configured_origin(server):
    url, _, _ = server
    for origin, allowed in ((ORIGIN, True), ("http://evil.example", False), (url, False)):
        r = requests.options(f"{url}/datastore/image?id=x", timeout=30,
                             headers={"Origin": origin, "Access-Control-Request-Method": "DELETE"})
        assert (r.headers.get("access-control-allow-origin") == origin) is allowed, (origin, r.status_code, dict(r.headers))
    r = call("GET", url, "/info/", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_traversal_on_every_route_never_touches_a_file_outside_the_datastore(server, samples_dir):
    url, root, studies = server
    outside = {p: tree(p) for p in (root / "tmp", APP_DIR.parent)}
    outside_file = (root / "outside.nii.gz").read_bytes()
    image_bytes = samples.image_path(samples_dir, IMAGE).read_bytes()
    label_bytes = samples.reference_path(samples_dir, IMAGE).read_bytes()
    before = call("GET", url, "/datastore/?output=all").json()
    evil = "../outside"
    up = lambda name, data: {"file": (name, data)}
    attacks = [
        ("PUT", f"/datastore/image?image={evil}", {"files": up("x.nii.gz", image_bytes)}),
        ("PUT", "/datastore/image?image=..%2F..%2Fadaptsam%2Fmain", {"files": up("x.nii.gz", image_bytes)}),
        ("PUT", "/datastore/image?image=.hidden", {"files": up("x.nii.gz", image_bytes)}),
        ("PUT", "/datastore/image", {"files": up("main.py", b"import os\n")}),
        ("PUT", "/datastore/", {"files": up("x.nii.gz/../../y.py", b"import os\n")}),
        ("PUT", f"/datastore/label?image={IMAGE}&tag=../../x", {"files": {"label": ("l.nii.gz", label_bytes)}}),
        ("PUT", f"/datastore/label?image={evil}", {"files": {"label": ("l.nii.gz", label_bytes)}}),
        ("PUT", f"/datastore/label?image={IMAGE}", {"files": {"label": ("l.py", label_bytes)}}),
        ("GET", f"/datastore/image?image={evil}", {}),
        ("HEAD", f"/datastore/image?image={evil}", {}),
        ("GET", f"/datastore/label?label={evil}&tag=final", {}),
        ("GET", f"/datastore/label?label={IMAGE}&tag=..", {}),
        ("GET", f"/datastore/image/info?image={evil}", {}),
        ("PUT", f"/datastore/image/info?image={evil}", {"data": {"info": "{}"}}),
        ("PUT", f"/datastore/label/info?label={evil}&tag=final", {"data": {"info": "{}"}}),
        ("DELETE", f"/datastore/image?id={evil}", {}),
        ("DELETE", f"/datastore/label?id={evil}&tag=final", {}),
        ("DELETE", f"/datastore/label?id={IMAGE}&tag=../final", {}),
        ("POST", f"/infer/adaptsam?image={evil}", {"data": {"params": json.dumps({"roi": [1, 5, 1, 5, 3, 3]})}}),
        ("POST", f"/infer/adaptsam?image={IMAGE}", {"data": {"params": json.dumps({"roi": [1, 5, 1, 5, 3, 3], "image": "/etc/passwd"})}}),
        ("POST", f"/infer/adaptsam?image={IMAGE}", {"data": {"params": json.dumps({"roi": [1, 5, 1, 5, 3, 3], "mask_prompt": str(root / "outside.nii.gz")})}}),
        ("GET", "/ohif/..%2F..%2F..%2Fmain.py", {}),
    ]
    for method, path, kw in attacks:
        r = call(method, url, path, **kw)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
    # a path with a literal `..` segment (clients normalise it away; send it raw)
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    conn.request("GET", "/datastore/../../info/", headers=AUTH)
    assert conn.getresponse().status == 422
    assert call("GET", url, "/datastore/?output=all").json() == before
    assert (root / "outside.nii.gz").read_bytes() == outside_file
    assert {p: tree(p) for p in outside} == outside
    assert sorted(p.name for p in root.iterdir()) == ["outside.nii.gz", "server.log", "studies", "tmp"]


def test_a_broken_label_is_refused_and_the_datastore_stays_as_it_was(server, samples_dir):
    url, root, studies = server
    label, affine, _ = samples.load_reference(samples_dir, IMAGE)
    good = np.asarray(label, np.uint8)
    shifted = affine.copy()
    shifted[:3, 3] += 4.0
    bomb = gzip.compress(b"\0" * (200 << 20), 9)  # 200 MB of zeros in ~200 kB
    broken = {
        "wrong shape": nifti_bytes(good[:, :, :-1], affine),
        "truncated": nifti_bytes(good, affine)[:5000],
        "random bytes": np.random.default_rng(0).bytes(3 << 20),
        "fractions": nifti_bytes(good.astype(np.float32) * 0.5, affine),
        "negative": nifti_bytes(good.astype(np.int16) - 1, affine),
        "off the grid": nifti_bytes(good, shifted),
        "gzip bomb": bomb,
    }
    before = call("GET", url, "/datastore/?output=all").json()
    files = tree(studies)
    for what, data in broken.items():
        r = call("PUT", url, f"/datastore/label?image={IMAGE}&tag=final", files={"label": ("label.nii.gz", data)})
        assert r.status_code in (413, 422), (what, r.status_code, r.text[:300])
    r = call("PUT", url, "/datastore/label?image=no_such_image", files={"label": ("label.nii.gz", nifti_bytes(good, affine))})
    assert r.status_code == 404
    assert call("GET", url, "/datastore/?output=all").json() == before
    assert tree(studies) == files
    # the good label goes in, and every temp file of all these uploads is gone
    r = call("PUT", url, f"/datastore/label?image={IMAGE}&tag=final", files={"label": ("label.nii.gz", nifti_bytes(good, affine))},
             data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})})
    assert r.status_code == 200, r.text
    saved = call("GET", url, f"/datastore/label?label={IMAGE}&tag=final")
    assert saved.status_code == 200
    assert np.array_equal(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(saved.content)).dataobj), good)
    assert list((root / "tmp").glob("adaptsam-upload-*")) == []


def test_bad_input_is_a_4xx_never_a_500(server):
    url, root, _ = server
    deep = "[" * 5000 + "]" * 5000
    infer = lambda params: call("POST", url, f"/infer/adaptsam?image={IMAGE}", data={"params": params})
    cases = [
        infer('{"foreground": [[Infinity, 3, 3]]}'),
        infer('{"foreground": [[1e309, 3, 3]]}'),
        infer('{"roi": [1, 1e309, 1, 5, 3, 3]}'),
        infer('{"roi": [1, 9, 1, 9, 3, 3], "slice": 1e309}'),
        infer('{"roi": [1, 9, 1, 9, 3, 3], "mode": []}'),
        infer('{"roi": [1, 9, 1, 9, 3, 3], "result_extension": ".txt"}'),
        infer('{"roi": [1, 9, 1, 9, 3, 3], "result_extension": "../x.nii.gz"}'),
        infer(json.dumps({"foreground": [[1, 1, 1]] * 65})),  # over the click cap
        infer(json.dumps({"roi": [1, 9, 1, 9, 3, 3], "labl": "liver"})),  # a typo is not silently ignored
        infer('{"foreground": ' + deep + "}"),
        call("POST", url, "/train/adaptsam", data=deep, headers={"Content-Type": "application/json"}),
        call("POST", url, "/train/nope", json={}),
        call("POST", url, "/train/adaptsam", json={"max_epochs": "many"}),
        call("DELETE", url, f"/datastore/label?id={IMAGE}_nope&tag=final"),
        call("DELETE", url, "/datastore/image?id=no_such_image"),
        call("GET", url, "/datastore/image/info?image=no_such_image"),
        call("PUT", url, f"/datastore/image/info?image={IMAGE}", data={"info": "{not json"}),
        call("PUT", url, f"/datastore/label?image={IMAGE}", files={"label": ("l.nii.gz", b"x")}, data={"params": "{bad"}),
        call("HEAD", url, f"/datastore/image?image={IMAGE}&check_sum=nosuchalgo:00"),
        call("PUT", url, "/model/adaptsam", files={"file": ("w.pt", b"weights")}),
        call("PUT", url, "/datastore/image?image=big", files={"file": ("big.nii.gz", b"\0" * (33 << 20))}),  # over max_upload_mb
    ]
    for i, r in enumerate(cases):
        assert 400 <= r.status_code < 500, (i, r.request.method, r.request.url, r.status_code, r.text[:300])
    assert cases[7].status_code == 413 and "at most" in cases[7].text
    assert cases[8].status_code == 422 and "labl" in cases[8].text
    assert cases[11].status_code == 404 and cases[-1].status_code == 413
    assert call("GET", url, "/train/", params={"check_if_running": "true"}).status_code == 404  # nothing was started
    assert list((root / "tmp").glob("adaptsam-upload-*")) == []
    r = infer(json.dumps({"roi": [40, 80, 40, 80, 10, 10], "mode": "slice"}))
    assert r.status_code == 200  # still serving


def _trainer_of(server_pid):
    for child in psutil.Process(server_pid).children(recursive=True):
        if "monailabel.interfaces.utils.app" in " ".join(child.cmdline()):
            return child
    return None


def test_a_killed_server_leaves_no_trainer_and_loses_no_saved_label(samples_dir, tmp_path):
    studies = copy_studies(samples_dir, tmp_path / "studies", image_ids={IMAGE})
    weights = tmp_path / "weights"
    weights.mkdir()
    conf = {"weights_dir": str(weights), "auto_train_every": "0", "train_publish": "always"}
    env = {"ADAPTSAM_API_TOKEN": TOKEN}
    with server_process(studies, conf=conf, log=tmp_path / "server.log", env=env, headers=AUTH) as (url, proc):
        r = call("PUT", url, f"/datastore/label?image={IMAGE}", files={"label": ("l.nii.gz", samples.reference_path(samples_dir, IMAGE).read_bytes())},
                 data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})})
        assert r.status_code == 200, r.text
        saved = tree(studies)
        assert call("POST", url, "/train/adaptsam", json={"max_epochs": 50, "max_minutes": 20}).status_code == 200
        deadline, trainer = time.time() + 120, None
        while trainer is None and time.time() < deadline:
            trainer = _trainer_of(proc.pid)
            time.sleep(0.5)
        assert trainer is not None, "no training process started"
        time.sleep(5)  # into its data loading or first steps
        os.kill(proc.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs([trainer], timeout=60)
        assert trainer in gone, "the trainer outlived its server"
        assert not list(weights.glob("adaptsam_*.pt")) and not list(weights.glob("candidates/*.pt"))
    assert tree(studies) == saved
    with server_process(studies, conf=conf, log=tmp_path / "server2.log", env=env, headers=AUTH) as (url, _):
        info = call("GET", url, f"/datastore/label/info?label={IMAGE}&tag=final").json()
        assert info["label_info"] == [{"name": "liver", "idx": 1}]
        assert call("GET", url, "/info/").json()["datastore"]["completed"] == 1
