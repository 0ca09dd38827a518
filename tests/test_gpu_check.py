"""benchmarks/gpu_check.py on any machine: without CUDA it stops at once, saying so; what it needs is named; JSON lines."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_without_cuda_it_says_so_and_exits_3(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    output = capsys.readouterr().out
    assert stopped.value.code == 3
    assert _json_lines(output) == [{"part": "setup", "ok": False, "cuda": False, "torch": torch.__version__, "torch_cuda": torch.version.cuda}]
    assert "no CUDA device here" in output and "make gpu-check" in output
    assert not (tmp_path / "out").exists()


def test_missing_wheels_and_data_are_named(monkeypatch, capsys, tmp_path):
    report = gpu_check.Report(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gpu_check.WHEELS else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as stopped:
        gpu_check.part_environment(report, tmp_path / "no_wheels")
    assert stopped.value.code == 4 and "make gpu-wheels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        gpu_check.data_root(report, str(tmp_path))
    output = capsys.readouterr().out
    assert stopped.value.code == 4 and "DATA_DIR" in output and "make gpu-data" in output
    assert [line["reason"] for line in _json_lines(output)] == ["data missing"]


def test_one_json_line_per_test_with_its_figures(capsys, tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a[cuda]" time="1.5"><properties><property name="max_abs_loss_diff" value="2e-07"/>'
        '<property name="nondeterministic_ops" value="none"/></properties></testcase>'
        '<testcase classname="tests.test_gpu" name="test_b" time="0.1"><failure message="assert 0.5 &gt; 0.78">...</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped type="pytest.skip" message="needs 2 GPUs"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, skipped = gpu_check.report_junit(gpu_check.Report(tmp_path), junit)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1} and skipped == ["needs 2 GPUs"]
    lines = _json_lines(capsys.readouterr().out)
    assert lines[0] == {"part": "tests", "test": "test_a[cuda]", "outcome": "passed", "seconds": 1.5, "max_abs_loss_diff": 2e-07, "nondeterministic_ops": "none"}
    assert lines[1]["outcome"] == "failed" and lines[1]["message"] == "assert 0.5 > 0.78"
    assert [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()] == lines
