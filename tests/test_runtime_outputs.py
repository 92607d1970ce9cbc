"""Files written safely (retinanet.runtime.outputs): atomic writes through a temporary file, flushed to disk; a write
that fails (a full disk) keeps the previous file whole, leaves no temporary file and says so in one line with the
free space: JSON files, figures, files written by a writer that takes a path (an ONNX graph), streamed lists."""

import errno
import io
import json
import os

import pytest

from retinanet.runtime import outputs
from retinanet.runtime.outputs import JsonList, WriteError, atomic_path, atomic_stream, save_figure, write_json


@pytest.fixture
def full_disk(monkeypatch):
    """Every flush to disk fails as a full disk does (ENOSPC)."""

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", no_space)


def _left(folder):
    return sorted(p.name for p in folder.iterdir())


def test_json_files_are_strict_and_written_whole(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"AP": float("nan"), "n": 3}, indent=2)
    assert json.loads(path.read_text()) == {"AP": None, "n": 3} and _left(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("kind", ["json", "figure", "path", "stream"])
def test_a_full_disk_keeps_the_previous_file_and_says_so_in_one_line(tmp_path, full_disk, monkeypatch, kind):
    name = {"json": "metrics.json", "figure": "curves.png", "path": "model.onnx", "stream": "detections.json"}[kind]
    previous = tmp_path / name
    previous.write_bytes(b"the earlier run's file")
    with pytest.raises(WriteError) as caught:
        if kind == "json":
            write_json(previous, {"AP": 0.5})
        elif kind == "figure":
            from matplotlib.figure import Figure

            save_figure(Figure(), previous)
        elif kind == "path":
            with atomic_path(previous) as written:  # as export writes its graph: by file name
                written.write_bytes(b"a new graph")
        else:
            with atomic_stream(previous) as f:
                items = JsonList(f, indent=1)
                items.add({"file": "a.png"})
                items.close()
    message = str(caught.value)
    assert "\n" not in message and f"cannot write {previous} (No space left on device)" in message
    assert "GB free in" in message and "previous file there, if any, is whole" in message
    assert previous.read_bytes() == b"the earlier run's file" and _left(tmp_path) == [name]


def test_an_error_inside_a_stream_keeps_the_previous_file(tmp_path):
    previous = tmp_path / "detections.json"
    previous.write_text("[]")
    with pytest.raises(KeyError), atomic_stream(previous) as f:
        f.write(b"[{")
        raise KeyError("an image that fails half way")
    assert previous.read_text() == "[]" and _left(tmp_path) == ["detections.json"]


def test_a_streamed_list_is_what_json_dumps_writes():
    for items in ([], [1], [{"a": [1, 2], "b": "x\ny"}, {}], [{"s": 0.5}] * 3):
        for indent in (None, 1, 2):
            buffer = io.BytesIO()
            streamed = JsonList(buffer, indent)
            for item in items:
                streamed.add(item)
            streamed.close()
            assert buffer.getvalue().decode() == json.dumps(items, indent=indent)


def test_nothing_is_left_behind_when_a_writer_fails(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "model.onnx") as written:
        written.write_bytes(b"half")
        raise ValueError("the checker refused the graph")
    assert _left(tmp_path) == [] and not os.path.exists(tmp_path / "model.onnx")


def test_an_earlier_detections_drawings_are_read_line_by_line_and_only_inside_the_folder(tmp_path):
    from retinanet.runtime.outputs import claim_detect_folder

    records = [
        {"file": 'x "drawing": "results.json"', "detections": [{"name": "drawing"}], "drawing": "a.png"},
        {"file": "b.png", "detections": [], "drawing": "../outside.png"},  # never a file outside the folder
        {"file": "c.png", "skipped": "unreadable", "detections": []},
    ]
    (tmp_path / "detections.json").write_text(json.dumps(records, indent=1))
    for name in ("a.png", "c.png", "results.json"):
        (tmp_path / name).write_text("earlier")
    (tmp_path.parent / "outside.png").write_text("not ours")
    found = claim_detect_folder(tmp_path, overwrite=True)
    assert sorted(p.name for p in found) == ["a.png", "detections.json", "results.json"]


def test_an_error_of_the_work_inside_a_stream_keeps_its_own_message(tmp_path):
    """A corrupt raster read while the results stream (rasterio's errors are OSErrors) is not a failed write."""
    with pytest.raises(OSError, match="corrupt raster") as caught, atomic_stream(tmp_path / "detections.json") as f:
        f.write(b"[")
        raise OSError("corrupt raster: big.tif")
    assert not isinstance(caught.value, WriteError) and _left(tmp_path) == []


def test_files_get_the_mode_a_new_file_gets(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_json(tmp_path / "metrics.json", {})
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
