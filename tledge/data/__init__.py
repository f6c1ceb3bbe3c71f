"""Images and their splits: decoding and preprocessing (:mod:`.images`), the train/val/test split and splits.json
(:mod:`.splits`), and the offline default dataset (:mod:`.datasets`)."""

from tledge.data.datasets import digits_dataset
from tledge.data.images import Preprocess, Sample, load_array, load_image, scan_images
from tledge.data.splits import Splits, load_splits, read_splits, splits_for, write_splits

__all__ = ["Preprocess", "Sample", "Splits", "digits_dataset", "load_array", "load_image", "load_splits", "read_splits", "scan_images", "splits_for", "write_splits"]
