"""pistill.export: GGUF (llama.cpp) and ONNX int4 (onnxruntime) exporters."""
