"""Run a real `monailabel start_server` process on loopback for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import requests

from adaptsam.engine.allocator import MALLOC_ENV
from adaptsam.engine.models import published_versions

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "adaptsam"
WEIGHTS = REPO / "model_weights"  # the shipped adapters


def shipped(kind: str = "2d", rollback: bool = False) -> Tuple[int, Path]:
    """(version, file) of the shipped adapter of `kind` that a server serves, or of the one git
    keeps before it for rollback."""
    versions = published_versions(WEIGHTS, kind, "litemedsam")
    return versions[-2] if rollback else versions[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_studies(samples_dir: Path, dest: Path, image_ids=None) -> Path:
    """A private copy of the sample datastore (tests save labels into it)."""
    src = Path(samples_dir) / "studies"
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.nii.gz"):
        if image_ids is None or f.name[: -len(".nii.gz")] in image_ids:
            shutil.copy2(f, dest / f.name)
    return dest


@contextlib.contextmanager
def running_server(studies: Path, conf: Optional[Dict[str, str]] = None, log: Optional[Path] = None, timeout: float = 300,
                   env: Optional[Dict[str, str]] = None) -> Iterator[str]:
    with server_process(studies, conf, log, timeout, env) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(studies: Path, conf: Optional[Dict[str, str]] = None, log: Optional[Path] = None, timeout: float = 300,
                   env: Optional[Dict[str, str]] = None, headers: Optional[Dict[str, str]] = None):
    """(url, process) of a server started as `make serve` starts it; `env` adds variables."""
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    # torch unless a test asks for another engine: a background conversion in every test server
    # would compete for the cores (tests/test_encoder_engines.py runs one on `auto`)
    for k, v in {"engine": "torch", **(conf or {})}.items():
        cmd += ["--conf", k, str(v)]
    env = {**os.environ, **(env or {})}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    for k, v in MALLOC_ENV.items():  # as `make serve` starts the server
        env.setdefault(k, v)
    out = open(log or (Path(studies).parent / f"server-{port}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {out.name}")
            try:
                if requests.get(url + "/info/", timeout=5, headers=headers).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server did not answer /info within {timeout} s; see {out.name}")
            time.sleep(1)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        out.close()
