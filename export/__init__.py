"""Export of one refinement pass and the encoder pass to ONNX and TensorRT engines."""
