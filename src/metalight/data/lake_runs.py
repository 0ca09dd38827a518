"""Lake et al.'s 20 one-shot classification runs (Science 2015) as fixed episodes.

Each run is a 20-way task within one evaluation alphabet: `runNN/training/classYY.png`, one drawing of
each of 20 characters (the support set), `runNN/test/itemYY.png`, 20 drawings by other people (the
queries), and `runNN/class_labels.txt`, one line `runNN/test/itemYY.png runNN/training/classZZ.png` per
query: its answer. They are read from `<data_dir>/omniglot/one_shot_runs.zip` (Lake's `all_runs.zip`,
fetched and md5-checked when missing and downloads are allowed) or its unpacked folder `one_shot_runs/`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from metalight.data.download import download_checked
from metalight.data.episode_files import Episode
from metalight.data.images import ImageRef
from metalight.errors import DataError

ARCHIVE = "one_shot_runs.zip"
FOLDER = "one_shot_runs"
LABELS = "class_labels.txt"


def _files(omniglot_dir: Path) -> tuple[dict[str, ImageRef | str], Path]:
    """Every file of the runs by its path below the runs' root (`runNN/...`): the answer keys' text, the drawings' ImageRefs; and where they were read from."""
    unpacked = omniglot_dir / FOLDER
    if unpacked.is_dir():
        files = {p.relative_to(unpacked).as_posix(): p for p in unpacked.rglob("*") if p.is_file()}
        return {key: p.read_text() if p.name == LABELS else ImageRef(str(p)) for key, p in files.items()}, unpacked
    archive = omniglot_dir / ARCHIVE
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            # a copy zipped with its top folder (all_runs/run01/...) reads like one without
            top = PurePosixPath(names[0]).parts[0] if names and not names[0].startswith("run") else None
            files: dict[str, ImageRef | str] = {}
            for name in names:
                key = "/".join(PurePosixPath(name).parts[1:]) if top and name.startswith(top + "/") else name
                files[key] = zf.read(name).decode() if key.endswith(LABELS) else ImageRef(name, archive)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read Lake's one-shot runs from {archive} ({exc}): replace it with an intact copy.") from exc
    return files, archive


def _run(name: str, files: dict[str, ImageRef | str], source: Path) -> Episode:
    """Run `name` (runNN): its 20 training drawings (support, class = file stem) and its test drawings labelled by the answer key."""
    labels = files.get(f"{name}/{LABELS}")
    if labels is None:
        raise DataError(f"{source} has no {name}/{LABELS}: replace it with an intact copy of Lake's runs.")
    answers = dict(line.split() for line in str(labels).splitlines() if line.strip())
    training = sorted(key for key in files if key.startswith(f"{name}/training/"))
    support = [(files[key], PurePosixPath(key).stem) for key in training]
    query = []
    for test in sorted(answers):
        answer = answers[test]
        if test not in files or answer not in files:
            raise DataError(f"{source}: {name}/{LABELS} names {test if test not in files else answer}, which is missing: replace the runs with an intact copy.")
        query.append((files[test], PurePosixPath(answer).stem))
    return Episode(name, support, query)  # type: ignore[arg-type]


def load_lake_runs(omniglot_dir: Path, download: bool, url: str, md5: str) -> list[Episode]:
    """Lake's runs 1..20 as Episodes, in order; fetched first when neither the zip nor the folder is there and `download` is set."""
    if not (omniglot_dir / FOLDER).is_dir() and not (omniglot_dir / ARCHIVE).is_file():
        if not download:
            raise DataError(
                f"Lake's one-shot runs not found: neither {omniglot_dir / FOLDER}/ nor {omniglot_dir / ARCHIVE} exists. Place "
                f"Lake's all_runs.zip there as {ARCHIVE} ({url}), or point DATA_DIR (or paths.data_dir=...) at the folder holding omniglot/."
            )
        omniglot_dir.mkdir(parents=True, exist_ok=True)
        download_checked(url, omniglot_dir, ARCHIVE, md5)
    files, source = _files(omniglot_dir)
    runs = sorted({key.split("/")[0] for key in files if key.startswith("run")})
    if not runs:
        raise DataError(f"{source} holds no runNN/ folders: replace it with Lake's all_runs.zip ({url}).")
    return [_run(name, files, source) for name in runs]
