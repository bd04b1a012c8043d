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
        counts = []
        with torch.inference_mode():
            model.encode(x)  # the first pass grows the heap to its working size
            for _ in range(3):  # the heap may still grow a little while threads interleave
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                model.encode(x)
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(counts)

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
    # glibc's defaults fault ~1.4 GB of pages in per pass (~360,000 faults); tuned, the quietest
    # warm pass faults at most a few MB (a CI run once saw one 64 MB heap extension)
    assert tuned["faults"] < 20000
    assert tuned["faults"] * 20 < default["faults"] or default["faults"] < 20000
