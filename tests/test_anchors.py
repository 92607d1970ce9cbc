import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet.ops.anchors import TORCHVISION_SIZES_PER_LEVEL, AnchorGenerator

GRIDS_512 = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]


def test_default_counts_512():
    gen = AnchorGenerator()
    assert gen.num_anchors_per_location() == 9
    levels = gen.anchors_per_level(GRIDS_512, (512, 512))
    assert [lvl.shape[0] for lvl in levels] == [h * w * 9 for h, w in GRIDS_512]
    anchors = gen(GRIDS_512, (512, 512))
    assert anchors.shape == (49104, 4)
    assert anchors.dtype == torch.float32
    assert torch.equal(torch.cat(levels), anchors)


def test_default_sizes_and_ratios_are_the_papers():
    gen = AnchorGenerator()
    levels = gen.anchors_per_level([(1, 1)] * 5, (512, 512), dtype=torch.float64)
    for lvl, base in zip(levels, (32, 64, 128, 256, 512)):
        w = lvl[:, 2] - lvl[:, 0]
        h = lvl[:, 3] - lvl[:, 1]
        sizes = [base * 2 ** (i / 3) for i in range(3)]
        torch.testing.assert_close(torch.sqrt(w * h), torch.tensor(sizes * 3, dtype=torch.float64))
        torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3, dtype=torch.float64))


def test_order_location_row_major_then_ratio_then_size():
    gen = AnchorGenerator(sizes_per_level=[(16.0, 32.0)], aspect_ratios=(0.5, 1.0, 2.0), strides=[8], offset=0.5)
    A = gen.num_anchors_per_location()
    assert A == 6
    H, W = 3, 5
    (anchors,) = gen.anchors_per_level([(H, W)], (24, 40), dtype=torch.float64)
    assert anchors.shape == (H * W * A, 4)
    for i in range(anchors.shape[0]):
        loc, kind = divmod(i, A)
        y, x = divmod(loc, W)
        ratio = (0.5, 1.0, 2.0)[kind // 2]
        size = (16.0, 32.0)[kind % 2]
        cx, cy = (anchors[i, 0] + anchors[i, 2]) / 2, (anchors[i, 1] + anchors[i, 3]) / 2
        assert (cx.item(), cy.item()) == pytest.approx(((x + 0.5) * 8, (y + 0.5) * 8))
        w, h = (anchors[i, 2] - anchors[i, 0]).item(), (anchors[i, 3] - anchors[i, 1]).item()
        assert h / w == pytest.approx(ratio)
        assert math.sqrt(w * h) == pytest.approx(size)


def test_torchvision_parity():
    image_hw = (320, 352)
    grids = [(40, 44), (20, 22), (10, 11), (5, 6), (3, 3)]
    tv = TVAnchorGenerator(TORCHVISION_SIZES_PER_LEVEL, ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    expected = tv(images, feats)[0]
    ours = AnchorGenerator.torchvision_style()
    assert TORCHVISION_SIZES_PER_LEVEL[0] == (32, 40, 50)
    got = ours(grids, image_hw)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    # strides are not powers of two at P6 / P7 here: 320 // 5 = 64 but 352 // 6 = 58, 320 // 3 = 106
    p7 = ours.anchors_per_level(grids, image_hw)[4]
    assert torch.equal(p7, expected[-3 * 3 * 9 :])


def test_cache_returns_same_tensor_and_is_bounded():
    gen = AnchorGenerator()
    a = gen(GRIDS_512, (512, 512))
    assert gen(GRIDS_512, (512, 512)) is a
    assert gen(GRIDS_512, (512, 512), dtype=torch.float64) is not a
    for n in range(1, 40):
        gen([(n, n)] * 5, (8 * n, 8 * n))
    assert len(gen._cache) <= 16


def test_half_dtype():
    anchors = AnchorGenerator()([(2, 2)] * 5, (16, 16), dtype=torch.float16)
    assert anchors.dtype == torch.float16 and anchors.shape == (5 * 4 * 9, 4)


def test_bad_args():
    with pytest.raises(ValueError, match="same, non-zero number of sizes"):
        AnchorGenerator(sizes_per_level=[(32.0,), (64.0, 80.0)], strides=[8, 16])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(strides=[8, 16])
    with pytest.raises(ValueError, match="grid sizes"):
        AnchorGenerator()([(4, 4)], (32, 32))
