"""apq-sdk: Adaptive Precision Quantization of LLMs, from a trained model to device packages.

Pipeline: profile (per-layer, per-candidate sensitivity from calibration Hessians) -> plan (exact
dynamic program over bit-widths under a memory or accuracy budget, one versioned plan file) ->
quantize (GPTQ at the planned bits, packed storage, per-token dynamic int8 activations) -> eval.
"""

__version__ = "0.1.0"


def load_quantized(path, device: str = "cpu"):
    """Load a model written by `apq-sdk quantize`: a torch module with forward and generate."""
    from .quantizer import load_quantized as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_quantized"]
