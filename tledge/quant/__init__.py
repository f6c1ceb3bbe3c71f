"""Stage 3, quantize: INT8 models from real calibration images, held to a drift budget.

* :mod:`.quantize`: the stage (config in, INT8 models and ``quantize.json`` out);
* :mod:`.calibration`, :mod:`.statistics`: the calibration images, and the activation statistics every range method reads;
* :mod:`.recipes`, :mod:`.checks`, :mod:`.cpu_weights`, :mod:`.saturation`: how each target's model is made and checked;
* :mod:`.sources`, :mod:`.weight_rounding`, :mod:`.bias_correction`, :mod:`.qat`: better weights before any float layer;
* :mod:`.drift_budget`, :mod:`.sensitivity`, :mod:`.engine_cost`: the budget, the float-layer search and its price;
* :mod:`.calibration_cache`: TensorRT's calibration cache format.
"""

from tledge.quant.quantize import QuantizeConfig, quantize

__all__ = ["QuantizeConfig", "quantize"]
