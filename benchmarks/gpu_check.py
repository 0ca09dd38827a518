"""One prepared GPU check (`make gpu-check`): the CUDA tests, the meta-step benchmark, a time-boxed paper protocol.

    python benchmarks/gpu_check.py [--budget 540] [--parts tests meta_step protocol] [--out DIR] [--data DIR] [--wheels .whl]

Prints one JSON object per line and figure ({"part": "setup" | "tests" | "meta_step" | "protocol" | "summary",
...}), then a short summary in words; each part runs under `timeout`, all of them within --budget seconds
(9 minutes), and its full output goes to <out>/<part>.log (default out: logs/gpu_check/<date>_<time>/).

* tests: `pytest -m gpu tests/test_gpu.py` (one line per test, with the figures it records);
* meta_step: `benchmarks/meta_step.py --device cuda --repeats 10` (its lines, tagged);
* protocol: `train.py experiment=maml_omniglot_5w1s trainer=gpu +trainer.max_time=...` for what is left of
  its share (about 2 minutes of training), then its test on 600 tasks: meta-steps, tasks/s, accuracies.

Needs torch with CUDA, lightning, tensorboard, numpy, pillow, torchvision, tqdm, pytest. hydra-core,
omegaconf and antlr4 may be missing: they are then installed from the wheels of `make gpu-wheels`
(--wheels, default .whl/) into <wheels>/site with pip --no-index --no-deps --target, and every part runs
with PYTHONPATH=<wheels>/site:src. The data: DATA_DIR (or --data, else ./data) holding omniglot/ with its two
zips and splits/vinyals/ (`make gpu-data` copies them into ./data, about 14 MB). Exit status: 0 all parts
passed, 1 a part failed or ran out of time, 3 no CUDA here (nothing checked), 4 something to install or bring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "meta_step", "protocol")
# seconds each part may take at most; the whole check stays within --budget
LIMITS = {"tests": 180, "meta_step": 150, "protocol": 200}
# a part that ignores SIGTERM at its limit is killed this much later
KILL_AFTER_S = 20
# the protocol run's time outside training: start, cache, validations, the test on 600 tasks
PROTOCOL_OVERHEAD_S = 75
REQUIRED = ("torch", "lightning", "tensorboard", "numpy", "PIL", "torchvision", "tqdm", "pytest", "yaml")
WHEELS = {"hydra": "hydra_core-1.3.8-", "omegaconf": "omegaconf-2.3.0-", "antlr4": "antlr4_python3_runtime-4.9.3-"}


class Report:
    """Where the JSON lines go: stdout and <out>/gpu_check.jsonl."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[dict] = []

    def emit(self, **line) -> dict:
        """Print one figure as a JSON line and keep it."""
        self.lines.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        if self.out.is_dir():
            with open(self.out / "gpu_check.jsonl", "a") as file:
                file.write(text + "\n")
        return line


def stop(report: Report, status: int, reason: str, message: str) -> None:
    """End the check: the reason as a JSON line, the message in words."""
    report.emit(part="setup", ok=False, reason=reason)
    print(f"gpu-check: {message}", flush=True)
    raise SystemExit(status)


# ---- setup: CUDA, packages, data ---------------------------------------------------------------------------
def part_environment(report: Report, wheels: Path) -> tuple[dict[str, str], str]:
    """The environment of every part (PYTHONPATH=src, plus the wheels' site folder when hydra is not installed) and where hydra comes from."""
    paths = [str(ROOT / "src")]
    source = "installed"
    if any(importlib.util.find_spec(name) is None for name in WHEELS):
        site = wheels / "site"
        if not (site / "hydra").is_dir():
            found = {name: sorted(wheels.glob(prefix + "*.whl")) for name, prefix in WHEELS.items()}
            missing = [WHEELS[name] + "*.whl" for name, files in found.items() if not files]
            if missing:
                stop(report, 4, "hydra missing", (
                    f"hydra-core/omegaconf are not installed and {wheels} lacks {', '.join(missing)}. On a machine with "
                    "a package index run `make gpu-wheels`, bring the .whl/ folder here, and run again."
                ))
            install_wheels([files[-1] for files in found.values()], site)
        paths.insert(0, str(site))
        source = f"wheels ({site})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env["PYTHONUNBUFFERED"] = "1"
    return env, source


def install_wheels(files: list[Path], site: Path) -> None:
    """pip install --no-index --no-deps --target site; without pip, unpack them (pure-Python wheels)."""
    site.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site), *map(str, files)]
    if importlib.util.find_spec("pip") is not None and subprocess.run(command).returncode == 0:
        return
    for wheel in files:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)


def data_root(report: Report, given: str | None) -> Path:
    """The folder holding omniglot/ (archives or folders, and the Vinyals split files), or stop saying how to bring it."""
    root = Path(given or os.environ.get("DATA_DIR") or ROOT / "data").resolve()
    omniglot = root / "omniglot"
    needed = [omniglot / "splits" / "vinyals" / f"{part}.txt" for part in ("train", "val", "test")]
    missing = [str(p) for p in needed if not p.is_file()]
    for archive in ("images_background", "images_evaluation"):
        if not (omniglot / f"{archive}.zip").is_file() and not (omniglot / archive).is_dir():
            missing.append(str(omniglot / f"{archive}.zip"))
    if missing:
        stop(report, 4, "data missing", (
            f"Omniglot is not complete under {root} (missing: {', '.join(missing)}). Set DATA_DIR (or --data) to the "
            "folder holding omniglot/, or run `make gpu-data` where the data is and bring the data/ folder (about 14 MB)."
        ))
    return root


# ---- running one part --------------------------------------------------------------------------------------
def run_part(command: list[str], limit: float, env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run `command` under `timeout` (SIGTERM at `limit` s, SIGKILL KILL_AFTER_S later), output to `log`: (status, seconds)."""
    if shutil.which("timeout"):
        command = ["timeout", f"--kill-after={KILL_AFTER_S}", str(int(limit)), *command]
    start = time.monotonic()
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=limit + KILL_AFTER_S + 5)
        except subprocess.TimeoutExpired:  # no coreutils timeout, or it could not stop the command
            os.killpg(process.pid, signal.SIGKILL)
            status = process.wait()
    return (124 if status in (-signal.SIGKILL, 137) else status), time.monotonic() - start


def part_tests(report: Report, limit: float, env: dict[str, str], out: Path) -> tuple[bool, str]:
    """pytest -m gpu: one line per test (outcome, seconds, recorded figures), then the counts."""
    junit = out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"), "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    status, seconds = run_part(command, limit, env, out / "tests.log")
    counts, skipped = report_junit(report, junit)
    report.emit(part="tests", **counts, status=status, seconds=round(seconds, 1))
    words = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in {seconds:.0f} s"
    words += " (out of time)" if status == 124 else ""
    words += f" (skipped: {'; '.join(skipped)})" if skipped else ""
    return status == 0 and counts["failed"] == 0 and counts["passed"] > 0, words


def report_junit(report: Report, junit: Path) -> tuple[dict[str, int], list[str]]:
    """One JSON line per test case of a junit file (outcome, seconds, its recorded properties): counts and skip reasons."""
    counts, skipped = {"passed": 0, "failed": 0, "skipped": 0}, set()
    if not junit.is_file():
        return counts, []
    for case in ElementTree.parse(junit).iter("testcase"):
        failure = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        outcome = "failed" if failure is not None else "skipped" if case.find("skipped") is not None else "passed"
        counts[outcome] += 1
        line = dict(part="tests", test=case.get("name"), outcome=outcome, seconds=round(float(case.get("time", 0)), 2))
        line.update({p.get("name"): _number(p.get("value")) for p in case.iter("property")})
        if failure is not None:
            line["message"] = failure.get("message", "")[:300]
        if outcome == "skipped":
            skipped.add(case.find("skipped").get("message", ""))
        report.emit(**line)
    return counts, sorted(skipped)


def part_meta_step(report: Report, limit: float, env: dict[str, str], out: Path) -> tuple[bool, str]:
    """benchmarks/meta_step.py --device cuda: its JSON lines, tagged part=meta_step."""
    command = [sys.executable, str(ROOT / "benchmarks" / "meta_step.py"), "--device", "cuda", "--repeats", "10"]
    status, seconds = run_part(command, limit, env, out / "meta_step.log")
    lines = []
    for text in (out / "meta_step.log").read_text().splitlines():
        if text.startswith("{"):
            lines.append(report.emit(part="meta_step", **json.loads(text)))
    vmap = next((x for x in lines if (x.get("algo"), x.get("case"), x.get("path")) == ("maml", "omniglot_5w1s", "vmap")), None)
    overhead = next((x for x in lines if x.get("path") == "lightning" and "lightning_overhead" in x), None)
    words = f"{len(lines)} figures in {seconds:.0f} s" + (" (out of time)" if status == 124 else "" if status == 0 else f" (exit status {status})")
    if vmap and {"tasks_per_s", "ratio_vs_reference", "peak_mib"} <= vmap.keys():
        words += f"; MAML vmap Omniglot 5w1s {vmap['tasks_per_s']:.0f} tasks/s ({vmap['ratio_vs_reference']:.1f}x the reference), peak {vmap['peak_mib']:.0f} MiB"
    if overhead:
        words += f"; Lightning overhead {100 * overhead['lightning_overhead']:.1f}%"
    return status == 0 and bool(lines), words


def part_protocol(report: Report, limit: float, env: dict[str, str], out: Path) -> tuple[bool, str]:
    """experiment=maml_omniglot_5w1s on the GPU for what the limit leaves, then its test: steps, tasks/s, accuracies."""
    train_s = int(limit - PROTOCOL_OVERHEAD_S)
    if train_s < 30:
        report.emit(part="protocol", skipped=True, reason=f"{limit:.0f} s left")
        return False, f"skipped: {limit:.0f} s left"
    run = out / "protocol"
    command = [
        sys.executable, str(ROOT / "train.py"), "experiment=maml_omniglot_5w1s", "trainer=gpu",
        f"+trainer.max_time=00:00:{train_s // 60:02d}:{train_s % 60:02d}", "logger=csv", f"hydra.run.dir={run}",
        "trainer.enable_progress_bar=false",
    ]
    status, seconds = run_part(command, limit, env, out / "protocol.log")
    results = _read_json(run / "results.json")
    speeds = _column(run / "csv" / "metrics.csv", "train/tasks_per_s")
    test_tasks = _config_value(run / ".hydra" / "config.yaml", "data", "n_test_tasks")
    line = report.emit(
        part="protocol", experiment="maml_omniglot_5w1s", max_time_s=train_s, status=status, seconds=round(seconds, 1),
        global_step=results.get("global_step"), tasks_per_s_median=round(statistics.median(speeds), 1) if speeds else None,
        tasks_per_s_max=round(max(speeds), 1) if speeds else None, best_val_acc=results.get("best_val_acc"),
        test_acc=results.get("test_acc"), test_acc_ci95=results.get("test_acc_ci95"), test_tasks=test_tasks, run_dir=str(run),
    )
    if status != 0 or line["test_acc"] is None:
        return False, f"exit status {status} after {seconds:.0f} s (see {out / 'protocol.log'})"
    return True, (
        f"{line['global_step']} meta-steps in {train_s} s, {line['tasks_per_s_median']} tasks/s (median), "
        f"test {100 * line['test_acc']:.2f} ± {100 * line['test_acc_ci95']:.2f}% ({test_tasks} tasks), best val {100 * line['best_val_acc']:.2f}%"
    )


def _number(text: str | None) -> float | str | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _config_value(path: Path, group: str, key: str) -> object:
    """cfg[group][key] of a run's saved config, or None."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())[group][key]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _column(path: Path, name: str) -> list[float]:
    """The logged values of one metric in a Lightning metrics.csv."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


# ---- main --------------------------------------------------------------------------------------------------
def main() -> None:
    """Check CUDA, bring hydra and the data, run the parts within the budget, summarize."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check (default 9 minutes)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--out", type=Path, default=None, help="default: logs/gpu_check/<date>_<time>")
    parser.add_argument("--data", default=None, help="the folder holding omniglot/ (default: $DATA_DIR, else ./data)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="hydra-core, omegaconf, antlr4 wheels (make gpu-wheels)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    out = args.out or ROOT / "logs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    report = Report(out)

    if importlib.util.find_spec("torch") is None:
        stop(report, 4, "torch missing", f"torch is not importable by {sys.executable}: run with the Python that has it (see README, GPUs).")
    import torch

    if not torch.cuda.is_available():
        report.emit(part="setup", ok=False, cuda=False, torch=torch.__version__, torch_cuda=torch.version.cuda)
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}; "
            "torch.cuda.is_available() is False): nothing to check. Run `make gpu-check` on a machine with an NVIDIA GPU.",
            flush=True,
        )
        raise SystemExit(3)
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        stop(report, 4, "packages missing", f"{', '.join(missing)} not importable by {sys.executable}: install them (see README, GPUs).")
    out.mkdir(parents=True, exist_ok=True)
    env, hydra_source = part_environment(report, args.wheels)
    env["DATA_DIR"] = str(data_root(report, args.data))
    device = torch.cuda.get_device_name(0)
    report.emit(
        part="setup", ok=True, device=device, gpus=torch.cuda.device_count(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        python=sys.executable, hydra=hydra_source, data_dir=env["DATA_DIR"], out=str(out),
    )

    start, words, passed = time.monotonic(), {}, True
    runners = {"tests": part_tests, "meta_step": part_meta_step, "protocol": part_protocol}
    for name in args.parts:
        limit = min(LIMITS[name], deadline - time.monotonic() - KILL_AFTER_S)  # so that even a killed part ends in time
        if limit < 20:
            report.emit(part=name, skipped=True, reason="out of time")
            ok, words[name] = False, "skipped: out of time"
        else:
            ok, words[name] = runners[name](report, limit, env, out)
        passed &= ok
        words[name] = ("ok    " if ok else "FAILED") + "  " + words[name]
    seconds = time.monotonic() - start
    report.emit(part="summary", ok=passed, device=device, seconds=round(seconds, 1), parts=list(args.parts))
    print(f"\ngpu-check on {device} ({torch.cuda.device_count()} GPU, torch {torch.__version__}) in {seconds / 60:.1f} min:")
    for name in args.parts:
        print(f"  {name:<10}{words[name]}")
    print(f"  outputs: {out}")
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
