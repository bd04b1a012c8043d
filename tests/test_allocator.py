"""The malloc settings the server and trainer apply: model passes in a worker thread stop
faulting fresh pages in (with glibc's defaults an encoder pass faults ~2 GB of pages in again,
which made it ~40 % slower on the 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from concurrent.futures import ThreadPoolExecutor
    from adaptsam.engine.allocator import keep_freed_memory
    tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
    import torch
    from adaptsam.model.backbones import build_model

    model = build_model("litemedsam").eval()
    x = torch.rand(1, 3, model.input_size, model.input_size)

    def faults_of_a_warm_pass():
        with torch.inference_mode():
            for _ in range(2):  # the first passes grow the heap to its working size
                model.encode(x)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model.encode(x)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with ThreadPoolExecutor(2) as pool:  # like the server's request threads
        faults = pool.submit(faults_of_a_warm_pass).result()
    print(json.dumps({"tuned": tuned, "faults": faults}))
    """
)


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_encoder_pass_in_a_worker_thread_reuses_memory():
    tuned = _probe("tuned")
    default = _probe("default")
    print(f"minor page faults of a warm encoder pass in a worker thread: tuned {tuned['faults']}, glibc defaults {default['faults']}")
    assert tuned["tuned"] is True
    # glibc's defaults fault ~1.5 GB of pages in per pass; tuned, at most a few stray MB
    assert tuned["faults"] < 5000
    assert tuned["faults"] * 20 < default["faults"] or default["faults"] < 5000
