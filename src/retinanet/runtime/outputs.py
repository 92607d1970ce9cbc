"""Output folders: checked for writing before any work, and never holding two runs' files mixed.

A training run refuses a folder that holds another run unless told to continue it (--resume) or to replace it
(--overwrite), which removes that run's files once the new run's checks have passed (only those: a user's other
files stay). `detect --overwrite` keeps a previous detection's files until the new one has written its own, then
removes those it did not write again. Files are written atomically (atomic_write): a failed write leaves the
previous file whole and says so in one line, with the folder's free space. Every check happens before anything is
computed or written, and fails in one line that says what to do.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

__all__ = [
    "DETECT_FILES",
    "RUN_FILES",
    "JsonList",
    "WriteError",
    "atomic_path",
    "atomic_stream",
    "atomic_write",
    "claim_detect_folder",
    "claim_run_folder",
    "remove",
    "remove_stale",
    "remove_temporary",
    "save_figure",
    "strict_json",
    "writable_folder",
    "write_error",
    "write_json",
    "writing",
]

# what a training run writes in its folder (iter_*.pt too, with keep_all_checkpoints)
RUN_FILES = (
    "config.yaml",
    "last.pt",
    "best.pt",
    "log.jsonl",
    "train.log",
    "training_curves.png",
    "skipped.json",
    "tb",
    "eval",
)
# what `retinanet detect` writes, besides the drawings its detections.json names
DETECT_FILES = ("detections.json", "results.json", "detections.csv", "skipped.json", "labels", "detections.geojson")


def writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """`folder`, once a file could be written in it, or in the nearest folder above it that exists (the writer
    makes the missing ones: a check that fails leaves nothing behind); a ValueError in one line otherwise (a
    read-only or full disk, a path that is a file, no permission)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(existing))
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(
            f"{folder}: cannot write the {what} there ({exc.strerror or exc}); give another folder"
        ) from None
    return folder


def claim_run_folder(folder: str | Path, resume: str | Path | None, overwrite: bool) -> list[Path]:
    """Check the folder of a training run before the run does anything: refused when it holds another run's files,
    unless the run resumes (`resume`) or `overwrite` asks to replace it; and writable. Returns the earlier run's
    files that `remove` must take away before the run writes (after its other checks passed, so that a run that
    fails at once leaves the earlier one whole)."""
    folder = Path(folder)
    found = _run_files(folder)
    if found and resume is None and not overwrite:
        shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        last = folder / "last.pt"
        go_on = f"continue it with --resume {last}, " if last.is_file() else "it has no checkpoint to resume; "
        raise ValueError(
            f"{folder} holds a training run already ({shown}): {go_on}write to a new folder "
            "(--set train.output_dir=...), or replace it with --overwrite"
        )
    writable_folder(folder, "training run")
    return found if overwrite and resume is None else []


def claim_detect_folder(folder: str | Path, overwrite: bool) -> list[Path]:
    """Check the output folder of `retinanet detect`: a previous detection's files there are refused unless
    `overwrite`; writable. Returns the previous detection's files (its drawings included), which stay until the new
    detection has written its own: `remove_stale` then takes away those it did not write again."""
    folder = Path(folder)
    previous = folder / "detections.json"
    if previous.exists() and not overwrite:
        raise ValueError(
            f"{folder} holds the results of an earlier detection (detections.json): write to a new "
            "folder (--output ...) or replace them with --overwrite"
        )
    writable_folder(folder, "detections")
    remove_temporary(folder, DETECT_FILES)  # what a run killed before its end left
    if not previous.exists():
        return []
    drawings = [folder / name for name in _drawings_listed(previous)]
    drawings = [p for p in drawings if p.is_file() and not p.is_symlink()]  # its own drawings, nothing else
    return [*drawings, *(p for p in (folder / name for name in DETECT_FILES) if p.exists())]


_DRAWING = re.compile(r'^ {1,2}"drawing": ("(?:[^"\\]|\\.)*")')


def _drawings_listed(detections_json: Path) -> list[str]:
    """The drawings an earlier detections.json names, read line by line (the file can hold millions of detections:
    it is never loaded whole). It is written with one key per line (retinanet.inference.writers); an unreadable
    file names none: its own files are replaced, the drawings stay."""
    names = []
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        with open(detections_json, encoding="utf-8") as f:
            for line in f:
                found = _DRAWING.match(line)
                if found:
                    names.append(json.loads(found.group(1)))
    return [n for n in names if isinstance(n, str) and Path(n).name == n and n.lower().endswith(".png")]


def remove_stale(paths: list[Path], written: list[Path]) -> None:
    """Remove the files of `paths` (and those inside its folders) that are not among `written`: what an earlier
    detection wrote and this one did not write again. A folder left empty goes too."""
    keep = {Path(p).resolve() for p in written}
    for path in paths:
        if path.is_dir():
            remove_stale(sorted(path.iterdir()), written)
            with contextlib.suppress(OSError):
                path.rmdir()  # only when nothing is left in it
        elif path.exists() and path.resolve() not in keep:
            remove([path])


def _run_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [
        p for p in sorted(folder.iterdir()) if p.name in RUN_FILES or (p.name.startswith("iter_") and p.suffix == ".pt")
    ]


def remove(paths: list[Path]) -> None:
    """Delete these files and folders (an earlier run's, being overwritten)."""
    for path in paths:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise ValueError(f"{path}: cannot remove the earlier run's file to overwrite it ({exc.strerror or exc})")


class WriteError(ValueError):
    """A file that could not be written (a full disk, a quota, a folder gone); the previous file is whole."""


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """One line for a failed write: the file, why, and the free space of its folder."""
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free in {folder}"
    except OSError:
        free = f"{folder} cannot be read"
    return WriteError(
        f"cannot write {path} ({exc.strerror or exc}); {free}. The previous file there, if any, is "
        "whole: free some space (or write elsewhere) and run again"
    )


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes to a binary file) to `path` through a temporary file in
    the same folder, flushed to disk and renamed over `path`: a reader (or a crash) sees the old file or the new
    one, never half of one. A write that fails leaves the old file whole and raises WriteError (write_error)."""
    with atomic_stream(path) as f, writing(path):
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError in the block is a failed write of `path` (WriteError, write_error): wrap the writing itself, not the
    work around it, whose own errors (an unreadable image, a corrupt raster) must keep their own message."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


class _Guarded:
    """A binary file whose writes fail as WriteError naming the file it becomes (a full disk mid-stream)."""

    def __init__(self, file: IO[bytes], path: Path):
        self.file, self.path = file, path

    def write(self, data: bytes) -> int:
        with writing(self.path):
            return self.file.write(data)

    def __getattr__(self, name: str) -> Any:  # flush, tell, seek, fileno: the file's own (torch.save, savefig)
        return getattr(self.file, name)


@contextlib.contextmanager
def atomic_stream(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write `path` piece by piece (results streamed as they are computed, never all in memory):
    `atomic_path`'s temporary file, which becomes `path` when the block ends. Its writes that fail raise WriteError;
    other errors in the block are left as they are."""
    with atomic_path(path) as tmp:
        with writing(path):
            f = open(tmp, "wb")
        try:
            yield _Guarded(f, Path(path))  # type: ignore[misc]
        finally:
            with writing(path):
                f.close()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (directly, or by a writer that takes a file name: an
    ONNX graph, wrapped in `writing`): it becomes `path` when the block ends, flushed to disk, given the mode a new
    file gets (not mkstemp's owner-only one) and renamed over it. An error in the block leaves the old file whole and
    the temporary one removed, and goes on as it is; a failed flush or rename raises WriteError (write_error)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with writing(path):
            with open(tmp, "rb+") as written:  # the bytes are on disk before the rename makes them the file
                os.fsync(written.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX; not possible on Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_temporary(folder: Path, names: Iterable[str]) -> None:
    """Remove the temporary files (and staging folders) left for `names` in `folder` by a run that was killed
    (SIGKILL, a power cut: no cleanup ran)."""
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """`value` as strict JSON (`strict_json`) written atomically (`atomic_write`): every JSON file a command writes."""
    return atomic_write(path, strict_json(value, indent=indent))


def save_figure(figure: Any, path: str | Path, dpi: float | str = 100) -> Path:
    """A matplotlib figure saved atomically, in the format its suffix names (.png, .pdf, .svg), at `dpi` ("figure":
    the figure's own)."""
    path = Path(path)
    return atomic_write(path, lambda f: figure.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi))


class JsonList:
    """A JSON list written item by item to a binary file, byte for byte as json.dumps(items, indent=indent) would
    write it whole (indent None: on one line): a long list never held in memory."""

    def __init__(self, file: IO[bytes], indent: int | None = None):
        self.file, self.indent, self.count = file, indent, 0

    def add(self, item: Any) -> None:
        if self.indent is None:
            text = ("[" if self.count == 0 else ", ") + json.dumps(item)
        else:
            pad = " " * self.indent  # a newline inside a JSON string is escaped: every raw one starts a line
            text = (
                ("[\n" if self.count == 0 else ",\n")
                + pad
                + json.dumps(item, indent=self.indent).replace("\n", "\n" + pad)
            )
        self.file.write(text.encode())
        self.count += 1

    def close(self) -> None:
        self.file.write(b"[]" if self.count == 0 else (b"]" if self.indent is None else b"\n]"))


def strict_json(value: Any, **dumps: Any) -> str:
    """JSON that strict readers accept: NaN and infinities (an AP pycocotools cannot define) become null; tensors
    and numpy values their plain numbers."""
    return json.dumps(_plain(value), allow_nan=False, **dumps)


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return _plain(value.tolist())
    return value
