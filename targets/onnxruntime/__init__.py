"""The arm64-linux target: ONNX Runtime with MatMulNBits weights."""
