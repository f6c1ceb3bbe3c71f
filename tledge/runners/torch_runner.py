"""A PyTorch module behind the runner interface (``runner(x) -> logits``, ``describe()``, ``close()``): the reference
every exported and quantized model is compared with."""

from __future__ import annotations

import numpy as np


class TorchRunner:
    """A PyTorch module in eval mode, on the CPU or a CUDA device."""

    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        self.device = device
        self.model = model.eval().to(device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
            if self.device != "cpu":
                torch.cuda.synchronize()
            return out.cpu().numpy()

    def describe(self) -> dict:
        import torch

        info = {"backend": f"torch-{'cpu' if self.device == 'cpu' else 'cuda'}", "runtime": f"torch {torch.__version__}", "device": self.device}
        if self.device != "cpu":
            info["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return info

    def close(self) -> None:
        self.model = None
