"""Stage 2, export: the fine-tuned model as ONNX, proved equal to PyTorch (:mod:`.onnx_export`), and ONNX files as
every later stage reads them, with tledge's metadata (:mod:`.onnx_io`)."""

from tledge.export.onnx_export import ExportConfig, export_onnx
from tledge.export.onnx_io import load_onnx, read_metadata, set_metadata

__all__ = ["ExportConfig", "export_onnx", "load_onnx", "read_metadata", "set_metadata"]
