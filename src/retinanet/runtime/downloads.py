"""Published weights fetched through torchvision's weights mechanism, with one clear error when that fails.

Online, the first use downloads into torch hub's cache and later uses read it from there. Offline, the download
fails with a deep URLError traceback; here it becomes a DownloadError (a ValueError, so the command line prints one
line and exits with status 2) that names what could not be fetched, from where, and how to give a local file
instead.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DownloadError", "fetch_state_dict"]


class DownloadError(ValueError):
    """Weights that could not be downloaded; the message says how to give a local file instead."""


def fetch_state_dict(weights: Any, what: str, instead: str) -> dict[str, Any]:
    """weights.get_state_dict() of a torchvision weights enum member, or DownloadError naming `what`, the URL and
    `instead` (how to pass a local copy)."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError and socket errors are OSErrors; a bad hash a RuntimeError
        reason = str(getattr(exc, "reason", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DownloadError(
            f"could not download {what} from {weights.url} ({reason}). Without a connection, download that file on "
            f"a machine that has one and {instead}"
        ) from None
