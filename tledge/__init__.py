"""tledge: fine-tune a pretrained vision model, export it, quantize it to INT8 and prove what it costs.

Importing tledge is cheap: torch, onnx and onnxruntime are imported by the stage that needs them.
"""

__version__ = "0.1.0"
