"""Which engine runs a served model's image encoder: torch eager, or the same encoder (adapters
inside) converted to OpenVINO for the CPU.

The adapters live inside the encoder, so every served model (base, each adapter version, 2D and
3D) is converted on its own, once: the result is kept on disk under a key made of the base
checkpoint's and the adapter file's SHA-256, the window of slices encoded together and the
OpenVINO version, and a restart loads it instead of converting again. Conversion runs in a
background thread and never blocks a click: torch answers until the converted encoder is
ready, and a failed conversion leaves torch serving with the reason logged.

Precision: fp32 is served. bf16, faster on CPUs that compute it natively but moving mask edges,
can be chosen in code and by the evaluation (`2d+openvino-bf16`); why it is not served:
docs/experiments.md, 2026-12-06.

An engine's embeddings are not bit-identical to another's, so a model served through OpenVINO
has its own model key (`.../v4+openvino`, `.../v4+openvino-bf16`): its embeddings never mix with
torch's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..model.backbones import file_sha256

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("f32", "bf16")
Encoder = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) in [0, 1] -> (B, 256, h, w)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(choice: str, device: str) -> str:
    """`auto`: OpenVINO for a CPU when it is installed, torch otherwise (CUDA included)."""
    if choice not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {choice!r}")
    if choice == "auto":
        return "openvino" if str(device).startswith("cpu") and openvino_available() else "torch"
    if choice == "openvino" and not str(device).startswith("cpu"):
        raise ValueError("engine openvino runs on the CPU; use device cpu or engine torch")
    return choice


def cpu_has_bf16() -> bool:
    """Whether OpenVINO computes bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# Whether `auto` and `openvino` compute in bf16 where the CPU has it. Not served: with the
# built-in evaluation it moved some prompt types' Dice by more than 0.005 from fp32
# (docs/experiments.md, 2026-12-06, "encoder precision"); a CPU with AMX may measure it again
# (python -m adaptsam.evaluate --models 3d+openvino,3d+openvino-bf16).
SERVE_BF16 = False


def default_precision() -> str:
    return "bf16" if SERVE_BF16 and cpu_has_bf16() else "f32"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptsam" / "openvino"


class _EncoderModule(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode(images)


class OpenVinoEncoders:
    """Converted encoders by serving model, converted in one background thread."""

    def __init__(self, cache_dir: Optional[Path] = None, convert: Optional[Callable] = None, precision: str = "f32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self._convert_fn = convert or self._convert  # tests pass a failing one
        self._ready: Dict[str, Encoder] = {}
        self._state: Dict[str, str] = {}  # key -> converting / ready / failed: <reason>
        self._lock = threading.Lock()

    @property
    def engine(self) -> str:
        """The engine's name in model keys and /info."""
        return "openvino" if self.precision == "f32" else f"openvino-{self.precision}"

    def key(self, model, adapter_file: Optional[str], batch: int) -> str:
        import openvino

        parts = [model.backbone, model.checkpoint_sha256, file_sha256(Path(adapter_file)) if adapter_file else "base",
                 str(batch), str(model.input_size), openvino.__version__]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def status(self) -> Dict[str, str]:
        with self._lock:
            return dict(self._state)

    def get(self, key: str, model, batch: int) -> Optional[Encoder]:
        """The converted encoder if ready; otherwise start its conversion (once) and return None."""
        with self._lock:
            if key in self._ready:
                return self._ready[key]
            if key in self._state:
                return None
            self._state[key] = "converting"
        threading.Thread(target=self._prepare, args=(key, model, batch), name=f"adaptsam-openvino-{key[:8]}", daemon=True).start()
        return None

    def wait(self, model, adapter_file: Optional[str], batch: int, timeout: float = 600) -> Optional[Encoder]:
        """Block until the conversion ended (tests, benchmarks); None if it failed."""
        deadline = time.time() + timeout
        key = self.key(model, adapter_file, batch)
        while time.time() < deadline:
            encoder = self.get(key, model, batch)
            if encoder is not None or self.status().get(key, "").startswith("failed"):
                return encoder
            time.sleep(0.2)
        return None

    def _prepare(self, key: str, model, batch: int) -> None:
        t0 = time.time()
        try:
            compiled = self._convert_fn(key, model, batch)
        except Exception as e:  # anything: torch keeps serving
            logger.warning("OpenVINO conversion of %s failed, torch keeps serving it: %s", key, e)
            with self._lock:
                self._state[key] = f"failed: {e.__class__.__name__}: {e}"
            return
        encoder = _compiled_encoder(compiled, batch, model)
        with self._lock:
            self._ready[key] = encoder
            self._state[key] = "ready"
        logger.info("OpenVINO encoder %s ready in %.1f s", key, time.time() - t0)

    def _convert(self, key: str, model, batch: int):
        import openvino as ov

        xml = self.cache_dir / f"{key}.xml"
        core = ov.Core()
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            converted = core.read_model(str(xml))
        else:
            example = torch.rand(batch, 3, model.input_size, model.input_size)
            with torch.no_grad():
                converted = ov.convert_model(_EncoderModule(model).eval(), example_input=example)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{key}.{os.getpid()}.xml"
            ov.save_model(converted, str(tmp), compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))  # the weights first: a complete .xml means both
            tmp.replace(xml)
        # compiled for the one batch the CPU path sends (a window; models.encode_batch): static
        # shapes run a few percent faster than the saved dynamic ones. f32 is asked for
        # explicitly: OpenVINO's CPU default is bf16 wherever the CPU has it.
        converted.reshape([batch, 3, model.input_size, model.input_size])
        return core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": self.precision})


def _compiled_encoder(compiled, batch: int, model) -> Encoder:
    request_lock = threading.Lock()  # one compiled model, callers in several threads

    def encode(images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != batch:  # compiled for the served window only
            return model.encode(images)
        with request_lock:
            out = compiled(images.detach().cpu().numpy())[0]
        return torch.from_numpy(out.copy())

    return encode
