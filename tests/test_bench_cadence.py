"""``python -m bench.cadence`` on a tiny network: one logged step per block of ``every``
steps, its JSON, and its argument errors."""

from __future__ import annotations

import json
import statistics

import pytest


def test_cadence_bench_writes_its_json(tmp_path, capsys):
    from fastmlp.bench import cadence

    argv = ["--batches", "3,5", "--every", "4", "--repeats", "2", "--depth", "2", "--width", "8"]
    assert cadence.main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cadence-*-1t.json")
    doc = json.loads(path.read_text())
    assert doc["every"] == 4 and doc["machine"]["torch_threads"] == 1
    assert [r["batch"] for r in doc["results"]] == [3, 5]
    for r in doc["results"]:
        assert r["steps_per_variant"] == 8 and r["logged_steps"] == 2
        assert set(r["block_ms"]) == {"plain", "plain-2", "fastmlp-off", "monitor"}
        assert all(len(v) == 2 and min(v) > 0 for v in r["block_ms"].values())
        blocks = r["block_ms"]
        ratios = [m / p for m, p in zip(blocks["monitor"], blocks["plain"], strict=True)]
        assert r["ratio"] == pytest.approx(statistics.median(ratios))
    assert "written to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cadence.main(["--every", "0", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --every: expected an integer >= 1, got '0'" in capsys.readouterr().err
