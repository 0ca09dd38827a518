"""Episode throughput of FewShotDataModule on one core: one JSON object per line, cold (cache build) and warm.

    python benchmarks/episodes.py [--root DATA_DIR] [--seconds 3] [--dataset omniglot miniimagenet] [--num-workers 0]

cold: a fresh cache directory, so setup() decodes every split (setup_s), then the first pass of episodes.
warm: a new data module on the built cache (setup_s is then the load time), episodes after one warm-up batch.
Episodes are drawn through train_dataloader(), by default with num_workers=0: the process itself, one
thread, one core (--num-workers 1: one persistent worker process, plus the transfer to the main process).
mb_per_s counts the uint8 image bytes of support and query sets.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metalight.data import FewShotDataModule

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"

# (dataset, image_size, n_way, k_shot, k_query, meta_batch_size) as in conf/data/*.yaml
CASES = [
    ("omniglot", 28, 5, 1, 15, 32),
    ("omniglot", 28, 20, 1, 15, 32),
    ("miniimagenet", 84, 5, 1, 15, 4),
    ("miniimagenet", 84, 5, 5, 15, 4),
]
SPLIT = {"omniglot": "vinyals", "miniimagenet": "ravi"}


def measure(dm: FewShotDataModule, seconds: float, warm_up: bool) -> tuple[int, float, int]:
    """(episodes, elapsed seconds, image bytes) drawing training meta-batches for about `seconds`."""
    loader = dm.train_dataloader()
    episodes = nbytes = 0
    while True:
        batches = iter(loader)
        if warm_up:
            next(batches)
            warm_up = False
        start = time.perf_counter()
        for batch in batches:
            episodes += batch["support_x"].shape[0]
            nbytes += batch["support_x"].numel() + batch["query_x"].numel()
            if time.perf_counter() - start >= seconds:
                return episodes, time.perf_counter() - start, nbytes


def run_case(root: Path, cache_dir: Path, case: tuple, phase: str, seconds: float, num_workers: int) -> dict:
    """Set up one data module on cache_dir and measure it; returns the JSON record."""
    dataset, image_size, n_way, k_shot, k_query, meta_batch_size = case
    conf = OmegaConf.load(CONF_DATA / f"{dataset}.yaml")  # its mean/std: the cold setup is the cache build alone
    start = time.perf_counter()
    dm = FewShotDataModule(
        dataset=dataset,
        root=str(root),
        split=SPLIT[dataset],
        image_size=image_size,
        n_way=n_way,
        k_shot=k_shot,
        k_query=k_query,
        meta_batch_size=meta_batch_size,
        batches_per_epoch=10**6,
        cache_dir=str(cache_dir),
        num_workers=num_workers,
        persistent_workers=True,
        mean=list(conf.mean),
        std=list(conf.std),
    )
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    episodes, elapsed, nbytes = measure(dm, seconds, warm_up=phase == "warm")
    return {
        "dataset": dataset,
        "n_way": n_way,
        "k_shot": k_shot,
        "k_query": k_query,
        "phase": phase,
        "episodes_per_s": round(episodes / elapsed, 1),
        "mb_per_s": round(nbytes / elapsed / 1e6, 1),
        "setup_s": round(setup_s, 2),
        "meta_batch_size": meta_batch_size,
        "num_workers": num_workers,
    }


def main() -> None:
    """Run every selected case cold then warm and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("DATA_DIR", "../shared/data"), help="folder with omniglot/")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per case and phase")
    parser.add_argument("--dataset", nargs="+", default=list(SPLIT), choices=list(SPLIT))
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in (c for c in CASES if c[0] in args.dataset):
        with tempfile.TemporaryDirectory(prefix="metalight-bench-") as cache_dir:
            for phase in ("cold", "warm"):
                record = run_case(Path(args.root), Path(cache_dir), case, phase, args.seconds, args.num_workers)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
