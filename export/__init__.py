"""kvexport: the command line and (later) the export pipeline to ExecuTorch and ONNX."""
