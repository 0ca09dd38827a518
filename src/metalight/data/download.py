"""Fetching a published data file once, checksum-verified: Omniglot's archives and Lake's one-shot runs."""

from __future__ import annotations

from pathlib import Path

from metalight.errors import DataError


def download_checked(url: str, folder: Path, filename: str, md5: str) -> Path:
    """Fetch `url` into folder/filename with torchvision's downloader and check its md5; DataError naming both and the fix."""
    from torchvision.datasets import utils

    try:
        utils.download_url(url, str(folder), filename=filename, md5=md5)
    except (OSError, RuntimeError) as exc:
        (folder / filename).unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} into {folder} ({exc}): download it yourself and place it there as {filename} "
            "(or its unpacked folder), or point DATA_DIR (or paths.data_dir=...) at a folder holding omniglot/."
        ) from exc
    return folder / filename
