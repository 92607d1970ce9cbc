"""The one resize rule and the one padding rule (retinanet.ops.resize), which every path of the package uses."""

import pytest
import torch

from retinanet.ops.resize import padded_size, resize_image, resize_scale, resized_size


def test_the_shorter_side_goes_to_min_size_unless_the_longer_would_pass_max_size():
    assert resize_scale(600, 800, 800, 1333) == pytest.approx(800 / 600)
    assert resized_size(600, 800, 800, 1333) == (800, 1067)
    assert resize_scale(400, 1600, 800, 1333) == pytest.approx(1333 / 1600)  # the longer side caps it
    assert resized_size(400, 1600, 800, 1333) == (333, 1333)
    assert resized_size(1, 3000, 800, 1333) == (1, 1333)  # never 0 px


def test_resize_image_keeps_an_image_already_at_its_size():
    image = torch.rand(3, 20, 30)
    assert resize_image(image, (20, 30)) is image
    assert resize_image(image, (10, 15)).shape == (3, 10, 15)


def test_padding_rounds_up_to_multiples():
    assert padded_size((100, 150), 128) == (128, 256)
    assert padded_size((128, 32), 32) == (128, 32)
    assert padded_size((1, 1), 32) == (32, 32)
