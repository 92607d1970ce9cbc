from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from retinanet.data import CocoDetection, SyntheticShapes


def _pixels(ds: SyntheticShapes, i: int) -> np.ndarray:
    return np.asarray(ds.load_image(i))


def test_categories_and_item_types() -> None:
    ds = SyntheticShapes("train", num_images=4, image_size=(48, 64))
    assert ds.categories == [
        {"id": k + 1, "name": n} for k, n in enumerate(("circle", "square", "triangle", "cross", "ellipse"))
    ]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert target["boxes"].canvas_size == (48, 64) and target["orig_size"] == (48, 64) and target["image_id"] == 0


def test_deterministic_by_seed_and_split() -> None:
    a = SyntheticShapes("train", num_images=3, image_size=(48, 48), seed=5)
    b = SyntheticShapes("train", num_images=3, image_size=(48, 48), seed=5)
    for i in (2, 0):  # any order: an image depends only on (seed, split, index)
        assert np.array_equal(_pixels(a, i), _pixels(b, i)) and torch.equal(a.records[i].boxes, b.records[i].boxes)
    val = SyntheticShapes("val", num_images=3, image_size=(48, 48), seed=5)
    other = SyntheticShapes("train", num_images=3, image_size=(48, 48), seed=6)
    for ds in (val, other):
        assert not np.array_equal(_pixels(a, 0), _pixels(ds, 0))


def test_has_empty_images_and_a_range_of_object_sizes() -> None:
    ds = SyntheticShapes("train", num_images=100, image_size=(128, 128))
    counts = [len(r.boxes) for r in ds.records]
    assert 2 <= counts.count(0) <= 20 and max(counts) >= 4
    boxes = torch.cat([r.boxes for r in ds.records])
    extent = (boxes[:, 2:] - boxes[:, :2]).max(1).values
    assert extent.min() <= 16 and extent.max() >= 64
    assert set(torch.cat([r.labels for r in ds.records]).tolist()) == set(range(5))


def test_boxes_are_tight_around_each_objects_pixels() -> None:
    # plain gradient backgrounds and solid fills: an object's colour appears nowhere but on the object
    ds = SyntheticShapes("val", num_images=12, image_size=(96, 96), clutter=0.0, textures=("solid",))
    checked = 0
    for i in range(len(ds)):
        pixels = _pixels(ds, i)
        objects = ds.layout(i)
        for k, (obj, box) in enumerate(zip(objects, ds.records[i].boxes.int().tolist())):
            ys, xs = np.nonzero((pixels == obj.colour).all(-1))
            x1, y1, x2, y2 = box
            assert len(xs) > 0 and xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            if k == len(objects) - 1:  # drawn last, so nothing hides its edges
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
                checked += 1
    assert checked >= 8


def test_write_round_trips_through_coco(tmp_path: Path) -> None:
    ds = SyntheticShapes("train", num_images=3, image_size=(32, 40), seed=1)
    images_dir, ann = ds.write(tmp_path / "shapes")
    coco = CocoDetection(images_dir, ann)
    assert coco.categories == ds.categories
    for i in range(3):
        (im1, t1), (im2, t2) = ds[i], coco[i]
        assert torch.equal(im1, im2) and torch.equal(t1["boxes"], t2["boxes"])
        assert torch.equal(t1["labels"], t2["labels"]) and t1["image_id"] == t2["image_id"]


def test_rejects_unknown_split_or_shape() -> None:
    with pytest.raises(ValueError, match="split 'test'"):
        SyntheticShapes("test", num_images=1)
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        SyntheticShapes("train", num_images=1, shapes=("circle", "blob"))
