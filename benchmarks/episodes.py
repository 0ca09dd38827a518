"""Episode throughput of FewShotDataModule and TextDataModule on one core: one JSON object per line, cold (cache build) and warm.

    python benchmarks/episodes.py [--root DATA_DIR] [--seconds 3] [--dataset omniglot miniimagenet banking77 clinc150] [--num-workers 0]

cold: a fresh cache directory, so setup() decodes every split (setup_s), then the first pass of episodes.
warm: a new data module on the built cache (setup_s is then the load time), episodes after one warm-up batch.
Episodes are drawn through train_dataloader(), by default with num_workers=0: the process itself, one
thread, one core (--num-workers 1: one persistent worker process, plus the transfer to the main process).
mb_per_s counts the uint8 image bytes of support and query sets.

Text (banking77, clinc150: intent sets, split 1, training intents): cold tokenizes the data set into its cache,
warm draws episodes of cached token ids, trimmed to the batch's longest utterance as on the device
(TextDataModule.on_after_batch_transfer). Beside warm, in the same process and on the same tasks, the obvious
reference: each episode's strings tokenized on the fly with the same tokenizer (`encode_batch`), padded to the
longest and cut at max_tokens ("phase": "reference"; "ratio" = warm episodes/s over the reference's). Both give
the same ids: the benchmark checks that on its first meta-batch. Text episodes/s count this process's CPU time (as
meta_step.py does: other jobs on a shared machine do not count), the two taking turns meta-batch by meta-batch.
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
from metalight.text import readers
from metalight.text.datamodule import TextDataModule
from metalight.text.pretrained import ADD_SPECIAL_TOKENS, PAD_ID

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"

# (dataset, image_size, n_way, k_shot, k_query, meta_batch_size) as in conf/data/*.yaml
CASES = [
    ("omniglot", 28, 5, 1, 15, 32),
    ("omniglot", 28, 20, 1, 15, 32),
    ("miniimagenet", 84, 5, 1, 15, 4),
    ("miniimagenet", 84, 5, 5, 15, 4),
]
SPLIT = {"omniglot": "vinyals", "miniimagenet": "ravi"}
# (intent set, n_way, k_shot, k_query, meta_batch_size) as conf/data/intents.yaml: Dopierre et al.'s 5 queries
TEXT_CASES = [("banking77", 5, 1, 5, 4), ("banking77", 5, 5, 5, 4), ("clinc150", 5, 1, 5, 4)]


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


def text_module(root: Path, cache_dir: Path, case: tuple) -> TextDataModule:
    """The TextDataModule of a text case, set up (tokenizing into cache_dir on a miss)."""
    dataset, n_way, k_shot, k_query, meta_batch_size = case
    dm = TextDataModule(
        dataset, str(root), 1, n_way=n_way, k_shot=k_shot, k_query=k_query, meta_batch_size=meta_batch_size,
        batches_per_epoch=10**6, cache_dir=str(cache_dir),
    )
    dm.setup("fit")
    return dm


class OnTheFly:
    """The reference: meta-batch of task keys -> the same tasks' utterances tokenized now, padded to the longest (cut at max_tokens)."""

    def __init__(self, dm: TextDataModule, root: Path) -> None:
        utterances = readers.read_jsonl(readers.intent_folder(root, dm.dataset) / "full.jsonl", "sentence", "label")
        self.texts = [utterances[name] for name in dm.label_names("train")]  # class c of the training split, in cache order
        self.episodes, self.tokenizer, self.max_tokens = dm._datasets["train"], dm.tokens.tokenizer, dm.max_tokens

    def ids(self, texts: list[str]) -> torch.Tensor:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=ADD_SPECIAL_TOKENS)
        rows = [e.ids[: self.max_tokens] for e in encodings]
        out = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out

    def __call__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        k_shot = self.episodes.k_shot
        support, query = [], []
        for epoch, index in keys:
            classes, samples = self.episodes.choose(epoch, index)
            support += [self.texts[c][j] for c, row in zip(classes, samples) for j in row[:k_shot]]
            query += [self.texts[c][j] for c, row in zip(classes, samples) for j in row[k_shot:]]
        ids = self.ids(support + query)  # one length for support and query, as a batch has
        n = len(keys)
        return {"support_x": ids[: len(support)].view(n, -1, ids.shape[-1]), "query_x": ids[len(support) :].view(n, -1, ids.shape[-1])}


def run_text_case(root: Path, cache_dir: Path, case: tuple, seconds: float) -> list[dict]:
    """Cold, warm and reference records of one text case (reference and warm alternate over the same task keys)."""
    dataset, n_way, k_shot, k_query, meta_batch_size = case
    start = time.perf_counter()
    dm = text_module(root, cache_dir, case)  # cold: the data set tokenized into the cache
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    dm = text_module(root, cache_dir, case)  # warm: the cache loaded
    warm_s = time.perf_counter() - start
    reference, episodes = OnTheFly(dm, root), dm._datasets["train"]
    keys = lambda step: [(0, step * meta_batch_size + t) for t in range(meta_batch_size)]  # noqa: E731
    ours = dm.on_after_batch_transfer(episodes[keys(0)], 0)
    theirs = reference(keys(0))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "the cached ids differ from the tokenizer's"
    elapsed, steps = {"warm": 0.0, "reference": 0.0}, {"warm": 0, "reference": 0}
    step = 1
    while min(elapsed.values()) < seconds:
        for phase, draw in (("warm", lambda k: dm.on_after_batch_transfer(episodes[k], 0)), ("reference", reference)):
            begin = time.process_time()
            draw(keys(step))
            elapsed[phase] += time.process_time() - begin
            steps[phase] += 1
        step += 1
    rate = {phase: steps[phase] * meta_batch_size / elapsed[phase] for phase in elapsed}
    common = {"dataset": dataset, "n_way": n_way, "k_shot": k_shot, "k_query": k_query, "meta_batch_size": meta_batch_size, "num_workers": 0}
    return [
        common | {"phase": "cold", "setup_s": round(cold_s, 2)},
        common | {"phase": "warm", "episodes_per_s": round(rate["warm"], 1), "setup_s": round(warm_s, 2), "ratio": round(rate["warm"] / rate["reference"], 1)},
        common | {"phase": "reference", "episodes_per_s": round(rate["reference"], 1)},
    ]


def main() -> None:
    """Run every selected case cold then warm and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("DATA_DIR", "../shared/data"), help="folder with omniglot/")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per case and phase")
    texts = sorted({case[0] for case in TEXT_CASES})
    parser.add_argument("--dataset", nargs="+", default=list(SPLIT), choices=[*SPLIT, *texts], help="default: %(default)s (text: " + ", ".join(texts) + ")")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for case in (c for c in CASES if c[0] in args.dataset):
        with tempfile.TemporaryDirectory(prefix="metalight-bench-") as cache_dir:
            for phase in ("cold", "warm"):
                record = run_case(Path(args.root), Path(cache_dir), case, phase, args.seconds, args.num_workers)
                print(json.dumps(record), flush=True)
    for case in (c for c in TEXT_CASES if c[0] in args.dataset):
        with tempfile.TemporaryDirectory(prefix="metalight-bench-") as cache_dir:
            for record in run_text_case(Path(args.root), Path(cache_dir), case, args.seconds):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
