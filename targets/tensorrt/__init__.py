"""TensorRT targets (jetson-orin, cuda-x86_64): ONNX with standard Q/DQ weights."""
