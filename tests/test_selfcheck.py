"""The table of scripts/gpu_check.sh, built from a JUnit XML and a benchmark JSON line (no GPU needed)."""

from __future__ import annotations

import json

from lmsys.selfcheck import main

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.gpu.test_gpu" name="test_adamw_8bit_trains_on_cuda" time="1.2"/>
<testcase classname="tests.gpu.test_gpu" name="test_packed_equals_padded_logits[llama-flash]" time="0.1">
<skipped type="pytest.skip" message="flash_attn is not installed">skip</skipped></testcase>
<testcase classname="tests.gpu.test_gpu" name="test_loss_falls[llama-float16]" time="2.0">
<failure message="AssertionError: [1.1, 1.2]&#10;second line">trace</failure></testcase>
</testsuite></testsuites>"""
BENCH = {"train_real_tokens_per_s_padded": 10000.0, "train_real_tokens_per_s_packed": 25000.0,
         "peak_gpu_mb_padded": 20480.0, "peak_gpu_mb_packed": 6144.0}


def test_table_from_junit_and_bench(tmp_path, capsys):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "bench.log").write_text("| table |\n" + json.dumps(BENCH) + "\n")
    code = main(["--junit", str(tmp_path / "junit.xml"), "--bench", str(tmp_path / "bench.log")])
    assert code == 1  # a check failed
    assert capsys.readouterr().out.splitlines() == [
        "| check                                         | result   | detail                         |",
        "|-----------------------------------------------|----------|--------------------------------|",
        "| test_adamw_8bit_trains_on_cuda                | pass     |                                |",
        "| test_packed_equals_padded_logits[llama-flash] | skip     | flash_attn is not installed    |",
        "| test_loss_falls[llama-float16]                | FAIL     | AssertionError: [1.1, 1.2]     |",
        "| train tokens/s, 1B Llama, packed vs padded    | 2.50x    | 25,000 vs 10,000 real tokens/s |",
        "| peak GPU memory, padded                       | 20.0 GiB |                                |",
        "| peak GPU memory, packed                       | 6.0 GiB  |                                |",
    ]


def test_all_skipped_or_missing_bench_result_fails(tmp_path, capsys):
    """On a machine without CUDA every GPU test skips: the check must not report success."""
    skipped = JUNIT.split("<testcase")[0] + "<testcase" + JUNIT.split("<testcase")[2].split("</testcase>")[0] + (
        "</testcase></testsuite></testsuites>")
    (tmp_path / "junit.xml").write_text(skipped)
    (tmp_path / "bench.log").write_text("bench child for packed failed\n")
    assert main(["--junit", str(tmp_path / "junit.xml")]) == 1
    assert main(["--junit", str(tmp_path / "junit.xml"), "--bench", str(tmp_path / "bench.log")]) == 1
    assert "| throughput benchmark" in capsys.readouterr().out
