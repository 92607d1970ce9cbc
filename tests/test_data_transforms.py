import pytest
import torch
from torchvision import tv_tensors

from retinanet.data import (
    ResizeShortLong,
    SyntheticShapes,
    collate_detection,
    eval_transforms,
    make_loader,
    train_transforms,
)
from retinanet.data.augment import Augmentation
from retinanet.data.transforms import resized_size


def _white_rectangle(height: int = 40, width: int = 60, box: tuple = (10, 5, 30, 20)) -> tuple:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes([list(box)], format="XYXY", canvas_size=(height, width), dtype=torch.float32),
        "labels": torch.tensor([3]),
        "iscrowd": torch.tensor([False]),
        "image_id": 7,
        "orig_size": (height, width),
    }
    return tv_tensors.Image(image), target


def test_resized_size_hand_values() -> None:
    assert resized_size(480, 640, 800, 1333) == (800, 1067)  # short side rules
    assert resized_size(100, 1000, 800, 1333) == (133, 1333)  # long side capped
    assert resized_size(20, 10, 5, 100) == (10, 5)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_transforms_keep_boxes_on_their_objects(flip_prob: float, seed: int) -> None:
    torch.manual_seed(seed)
    image, target = train_transforms((24, 32, 48), max_size=64, augmentation=Augmentation(hflip=flip_prob))(
        *_white_rectangle()
    )
    assert image.dtype == torch.float32 and image.shape[1] in (24, 32, 43) and max(image.shape[1:]) <= 64
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    white = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    box = target["boxes"][0].as_subclass(torch.Tensor)
    assert torch.allclose(box, white, atol=1.0), (box, white)
    assert target["boxes"].canvas_size == tuple(image.shape[1:])
    assert target["labels"].tolist() == [3] and target["image_id"] == 7 and target["orig_size"] == (40, 60)


def test_sanitize_keeps_labels_and_iscrowd_in_step() -> None:
    image, target = _white_rectangle(40, 200)
    target["boxes"] = tv_tensors.BoundingBoxes(
        [[10, 5, 30, 20], [50, 5, 51.5, 20], [60, 5, 90, 30]], format="XYXY", canvas_size=(40, 200)
    )
    target["labels"], target["iscrowd"] = torch.tensor([0, 1, 2]), torch.tensor([False, False, True])
    _, out = train_transforms((10,), max_size=50, augmentation=Augmentation(hflip=0.0))(
        image, target
    )  # scale 0.25: box 1 is < 1 px
    assert out["labels"].tolist() == [0, 2] and out["iscrowd"].tolist() == [False, True]
    assert out["boxes"].shape == (2, 4)


def test_eval_transforms_and_collate_map_boxes_back() -> None:
    image, target = _white_rectangle()
    images, targets = collate_detection([eval_transforms(20, 100)(image, target)])
    t = targets[0]
    assert set(t) == {"boxes", "labels", "iscrowd", "image_id", "orig_size", "size", "scale"}
    assert type(images[0]) is torch.Tensor and type(t["boxes"]) is torch.Tensor
    assert images[0].shape == (3, 20, 30) and t["size"] == (20, 30) and t["orig_size"] == (40, 60)
    sy, sx = t["scale"]
    assert (sy, sx) == (0.5, 0.5)
    assert torch.allclose(t["boxes"] / torch.tensor([sx, sy, sx, sy]), torch.tensor([[10.0, 5.0, 30.0, 20.0]]))


def test_empty_targets_pass_through() -> None:
    image, target = _white_rectangle()
    target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(40, 60))
    target["labels"], target["iscrowd"] = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    _, out = train_transforms((30,), 100)(image, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["iscrowd"].shape == (0,)


def test_resize_short_long_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="ResizeShortLong"):
        ResizeShortLong((), 10)


def test_make_loader_batches_and_is_reproducible() -> None:
    ds = SyntheticShapes("train", num_images=6, image_size=(32, 32), transforms=train_transforms((32, 40), 64))

    def ids(loader) -> list[int]:
        return [t["image_id"] for _, targets in loader for t in targets]

    first = ids(make_loader(ds, batch_size=4, shuffle=True, seed=3))
    assert sorted(first) == list(range(6)) and first == ids(make_loader(ds, batch_size=4, shuffle=True, seed=3))
    images, targets = next(iter(make_loader(ds, batch_size=2, shuffle=False, num_workers=1)))
    assert len(images) == 2 and [t["image_id"] for t in targets] == [0, 1] and images[0].dtype == torch.float32
