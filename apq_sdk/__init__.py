"""apq-sdk: Adaptive Precision Quantization of LLMs, from a trained model to device packages.

Pipeline: profile (per-layer, per-candidate sensitivity from calibration Hessians) -> plan (exact
dynamic program over bit-widths under a memory or accuracy budget, one versioned plan file) ->
quantize (GPTQ at the planned bits, packed storage, per-token dynamic int8 activations) -> build
(lower the same plan into a device package for a target, and verify it).

The verbs below are the public Python API (apq_sdk.api); `apq-sdk --help` is the same as a CLI.
"""

__version__ = "0.1.0"

from .api import build, load, plan, profile, quantize, verify  # noqa: E402


def load_quantized(path, device: str = "cpu"):
    """Load a model written by `apq-sdk quantize` (the same as `load`)."""
    return load(path, device=device)


__all__ = ["__version__", "profile", "plan", "quantize", "load", "build", "verify",
           "load_quantized"]
