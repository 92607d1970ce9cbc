"""Training augmentation as configuration: presets and per-operation keys, and boxes that stay on their objects
through every operation (flips, 90-degree rotations, colour and scale jitter, crops, mosaics)."""

import pytest
import torch
from conftest import write_run_config
from torchvision import tv_tensors

from retinanet.cli import main
from retinanet.config import DataConfig, load_run_config, model_config
from retinanet.data import build_dataset, train_transforms
from retinanet.data.augment import PRESETS, Augmentation, Mosaic, RandomCropBoxes, RandomRotate90, augmentation_of


def _image_with(rectangles, height=48, width=64, values=None):
    """A black uint8 image with filled rectangles (x1, y1, x2, y2) of the given grey values, and its target."""
    values = values or [255] * len(rectangles)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for (x1, y1, x2, y2), v in zip(rectangles, values):
        image[:, y1:y2, x1:x2] = v
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(rectangles, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.arange(len(rectangles)),
        "iscrowd": torch.zeros(len(rectangles), dtype=torch.bool),
        "image_id": 1,
        "orig_size": (height, width),
    }
    return tv_tensors.Image(image), target


def _inside_mean(image, box) -> float:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return float(image[:, y1:y2, x1:x2].float().mean())


def test_presets_and_per_operation_keys():
    assert augmentation_of(DataConfig()) == PRESETS["flip"] == Augmentation()  # the paper's: flips only
    top = augmentation_of(DataConfig(augment="top_down"))
    assert top.vflip and top.rotate90 and top.brightness and top.crop and top.mosaic and top.scale_jitter != (1, 1)
    mine = augmentation_of(DataConfig(augment="top_down", vflip_prob=0.0, mosaic_prob=0.25, scale_jitter=(0.5, 2.0)))
    assert mine.vflip == 0 and mine.mosaic == 0.25 and mine.scale_jitter == (0.5, 2.0) and mine.hflip == top.hflip
    assert augmentation_of(DataConfig(augment="none")).describe() == "none"
    with pytest.raises(ValueError, match=r"data config: crop_scale = \[0.9, 0.5\]"):
        augmentation_of(DataConfig(crop_scale=(0.9, 0.5)))
    with pytest.raises(ValueError, match="augment = 'aerial' is not one of"):
        DataConfig(augment="aerial").check()


@pytest.mark.parametrize("seed", range(8))
def test_rotations_by_90_degrees_move_the_boxes_with_the_pixels(seed):
    torch.manual_seed(seed)
    image, target = _image_with([(5, 4, 25, 14)], height=30, width=40)
    out, t = RandomRotate90(p=1.0)(image, target)
    assert tuple(out.shape[-2:]) in ((40, 30), (30, 40))  # a quarter turn swaps the sides, a half turn keeps them
    (box,) = t["boxes"]
    assert (box[2] - box[0]) * (box[3] - box[1]) == 200 and _inside_mean(out, box) == 255
    assert int((out > 0).sum()) == int((image > 0).sum())  # exact: no pixel interpolated


def test_a_crop_clips_the_boxes_and_drops_those_mostly_outside():
    image, target = _image_with([(0, 0, 20, 20), (30, 10, 60, 40), (50, 40, 64, 48)])
    crop = RandomCropBoxes(p=1.0, scale=(0.5, 0.5), min_visible=0.5)
    torch.manual_seed(0)
    for _ in range(20):
        out, t = crop(image, target)
        assert out.shape[-2:] == (24, 32)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"])
        for box, label in zip(t["boxes"], t["labels"]):
            original = target["boxes"][label]
            kept = float((box[2] - box[0]) * (box[3] - box[1]))
            assert kept >= 0.5 * float((original[2] - original[0]) * (original[3] - original[1]))
            assert _inside_mean(out, box) == 255  # the clipped box still covers its object's pixels only


def test_a_mosaic_takes_a_part_of_each_image_with_its_boxes():
    parts = [_image_with([(8, 8, 56, 40)], values=[v]) for v in (50, 100, 150, 200)]
    torch.manual_seed(3)
    image, target = Mosaic(min_visible=0.1)([p[0] for p in parts], [p[1] for p in parts])
    assert image.shape == (3, 48, 64) and target["image_id"] == 1
    values = {round(_inside_mean(image, box)) for box in target["boxes"]}
    assert values <= {50, 100, 150, 200} and len(values) >= 3  # each box on the pixels of its own image
    assert len(target["labels"]) == len(target["boxes"]) == len(target["iscrowd"])


@pytest.mark.parametrize("seed", range(6))
def test_the_top_down_preset_keeps_every_box_on_its_object(seed):
    torch.manual_seed(seed)
    transforms = train_transforms((48, 64), 80, PRESETS["top_down"])
    image, target = _image_with([(4, 4, 20, 18), (34, 20, 60, 44)])
    out, t = transforms(image, target)
    assert out.dtype == torch.float32 and len(t["boxes"]) == len(t["labels"])
    for box in t["boxes"]:
        assert _inside_mean(out, box) > 0.4  # jittered brightness, but the object's pixels, not the background's


def test_the_dataset_makes_mosaics_of_its_own_images(tmp_path):
    data = DataConfig(
        synthetic_train_images=6,
        synthetic_image_size=64,
        augment="top_down",
        mosaic_prob=1.0,
        crop_prob=0.0,
        scale_jitter=(1.0, 1.0),
        rotate90_prob=0.0,
    )
    dataset = build_dataset(data, model_config("retinanet_tiny", min_size=64, max_size=64), "train", train_mode=True)
    assert dataset.mosaic == 1.0
    torch.manual_seed(0)
    counts = [len(dataset[0][1]["boxes"]) for _ in range(5)]
    assert len(set(counts)) > 1  # other images' objects come and go with the draw


def test_inspect_augment_shows_the_configured_augmentation(tmp_path, capsys):
    config = write_run_config(tmp_path / "run.yaml", data={"augment": "top_down", "synthetic_train_images": 4})
    assert load_run_config(config).data.augment == "top_down"
    out = tmp_path / "inspect"
    assert main(["inspect", "--config", config, "--output", str(out), "--augment", "--limit", "4"]) == 0
    assert len(list((out / "images").iterdir())) == 4


def test_cached_images_are_decoded_once_and_give_the_same_samples(tmp_path):
    from retinanet.data import SyntheticShapes

    shapes = SyntheticShapes("train", num_images=3, image_size=(48, 64), seed=1)
    rows = []
    for i, record in enumerate(shapes.records):
        shapes.load_image(i).save(tmp_path / f"{i}.png")
        rows += [
            f"{i}.png,{','.join(str(round(v)) for v in box.tolist())},{shapes.category_names[int(label)]}"
            for box, label in zip(record.boxes, record.labels)
        ]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    model = model_config("retinanet_tiny", min_size=48, max_size=64)
    samples = {}
    for cache in (False, True):
        data = DataConfig(
            format="csv", train_annotations=str(tmp_path / "train.csv"), augment="top_down", cache_images=cache
        )
        dataset = build_dataset(data, model, "train", train_mode=True)
        decoded = []
        load = dataset.load_image
        dataset.load_image = lambda i: decoded.append(i) or load(i)
        torch.manual_seed(0)
        samples[cache] = [dataset[i % 3] for i in range(9)]  # three epochs, each image jittered, cropped, mosaicked
        assert sorted(set(decoded)) == [0, 1, 2] and (len(decoded) == 3) == cache
    for (image, target), (cached, cached_target) in zip(samples[False], samples[True]):
        assert torch.equal(image, cached) and torch.equal(target["boxes"], cached_target["boxes"])


def test_colour_matrix_equals_torchvisions_brightness_contrast_and_saturation():
    import torchvision.transforms.v2.functional as TF

    from retinanet.data.augment import ColorMatrixJitter, color_matrix

    x = 0.35 + 0.3 * torch.rand(3, 50, 60)  # mid-range pixels: no clamping between torchvision's steps
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 0.9), 1.1), 0.8)
    params = {"brightness": 0.9, "contrast": 1.1, "matrix": color_matrix(0.9, 1.1, 0.8, 0.0)}
    ours = ColorMatrixJitter().transform(tv_tensors.Image(x), params)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), expected, rtol=0, atol=1e-5)


def test_hue_turns_colours_about_the_grey_axis():
    from retinanet.data.augment import color_matrix

    third = color_matrix(1.0, 1.0, 1.0, 1 / 3)  # a third of a turn takes red to green, green to blue
    torch.testing.assert_close(third @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(third @ torch.tensor([0.0, 1, 0]), torch.tensor([0.0, 0, 1]), atol=1e-6, rtol=0)
    grey = torch.full((3,), 0.4)
    torch.testing.assert_close(color_matrix(1.0, 1.0, 1.0, 0.07) @ grey, grey)  # greys stay grey
    torch.testing.assert_close(color_matrix(1.0, 1.0, 1.0, 0.0), torch.eye(3))


def test_colour_jitter_keeps_uint8_and_boxes():
    from retinanet.data.augment import ColorMatrixJitter

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2, 20, 30]]), format="XYXY", canvas_size=(40, 30))
    out, out_boxes = ColorMatrixJitter(0.3, 0.3, 0.3, 0.1)(image, boxes)
    assert out.dtype == torch.uint8 and out.shape == image.shape and not torch.equal(out, image)
    assert torch.equal(out_boxes, boxes)
