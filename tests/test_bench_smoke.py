"""The benchmark machinery on a tiny network: structure of the JSON and markdown, not speed."""

from __future__ import annotations

import json

import pytest
from fastmlp.bench import report
from fastmlp.bench.cli import main
from fastmlp.bench.hooks import HookStats
from fastmlp.bench.timing import interleaved, quantiles

TINY = [
    "--device", "cpu", "--repeats", "2", "--curve-repeats", "1", "--warmup", "1",
    "--min-time", "0", "--width", "16", "--depth", "2", "--in-features", "24",
    "--batch", "8", "--batches", "3,8", "--widths", "none", "--shapeset-images", "4",
    "--variants", "plain,hooks,hooks-all,hooks-naive,fastmlp-moments,fastmlp-all,plain-graph",
    "--curve-variants", "plain,hooks,fastmlp-all", "--name", "tiny", "--note", "smoke test",
]  # fmt: skip


def test_quick_machinery_writes_json_and_markdown(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--no-plots"]) == 0
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["schema"].startswith("fastmlp-bench/")
    assert {"cpu", "cpu_cores", "torch", "triton"} <= set(doc["machine"])
    assert doc["command"].startswith("python -m bench --device cpu") and doc["note"] == "smoke test"
    main_rows = [r for r in doc["rows"] if r["section"] == "main"]
    assert {(r["variant"], r["mode"]) for r in main_rows} >= {
        (v, m) for v in ("plain", "hooks", "fastmlp-all") for m in ("step", "forward")
    }
    for r in main_rows:
        if r["variant"] == "plain-graph":
            assert r["status"] == "n/a" and "CUDA" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["q25_s"] <= r["median_s"] <= r["q75_s"] and len(r["times_s"]) == 2
        assert r["ratio"] > 0
    assert next(r for r in main_rows if r["variant"] == "plain")["ratio"] == 1.0
    assert sorted({r["batch"] for r in doc["rows"] if r["section"] == "batch"}) == [3, 8]
    assert "shapeset" in doc and doc["shapeset"]["status"] in ("ok", "skipped")
    out = capsys.readouterr().out
    table_start = out.index("| variant | step ms (IQR) | step / plain |")
    assert "`fastmlp-all`" in out[table_start:]
    # The README generator reads the same JSON back.
    md = report.render(report.load(tmp_path / "tiny.json"))
    assert "Training step vs batch" in md and "`hooks`" in md


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--width", "0"], "argument --width: expected an integer >= 1, got '0'"),
        (["--repeats", "x"], "argument --repeats: expected an integer, got 'x'"),
        (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
        (["--min-time", "-1"], "argument --min-time: expected a finite number >= 0, got '-1'"),
        (["--batch", "8,0"], "argument --batch: expected integers >= 1, got '8,0'"),
        (["--device", "foo"], "--device must be cpu or cuda[:N], got 'foo'"),
    ],
)
def test_bench_options_out_of_range_are_refused_with_one_line(argv, said, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--no-plots"])
    err = capsys.readouterr().err
    assert (exit_.value.code == 2 and said in err) or exit_.value.code == said
    assert "Traceback" not in err


def test_bench_out_is_checked_before_the_run_and_created(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(a_file)])
    assert exit_.value.code == 2
    assert f"argument --out: '{a_file}' exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(a_file / "below")])
    assert "argument --out: cannot create directory" in capsys.readouterr().err
    from fastmlp.bench.command import output_dir

    assert output_dir(str(tmp_path / "new" / "nested")).is_dir()


@pytest.mark.parametrize(
    ("raised", "status", "said"),
    [
        (KeyboardInterrupt(), 130, "prog: interrupted"),
        (FileNotFoundError(2, "No such file or directory", "/x/y"), 2, "prog: error: No such"),
        (OSError(28, "No space left on device", "/x/y"), 1, "prog: error: No space left"),
    ],
)
def test_bench_entry_reports_ctrl_c_and_os_errors_in_one_line(raised, status, said, capsys):
    from fastmlp.bench.command import entry

    def main() -> int:
        raise raised

    with pytest.raises(SystemExit) as exit_:
        entry("prog", main)
    err = capsys.readouterr().err
    assert exit_.value.code == status and err.startswith(said) and err.count("\n") == 1


def test_report_replaces_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.update_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{report.START}\n| new |\n{report.END}\noutro\n"
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="block"):
        report.update_readme(tmp_path / "bad.md", "x")


def test_hook_stats_match_reference():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    hooks = HookStats(model, histograms=True, bins=8)
    x = torch.randn(11, 5)
    model(x).sum().backward()
    z = torch.nn.functional.linear(x, model[0].weight, model[0].bias)  # no hook
    acc = hooks.acc[1, "preactivation"]
    ref = z.detach().double()
    assert acc.count.item() == ref.numel()
    assert acc.mean.item() == pytest.approx(ref.mean().item(), abs=1e-6)
    assert (acc.m2 / acc.count).item() == pytest.approx(ref.var(unbiased=False).item(), rel=1e-5)
    assert acc.hist.sum().item() == ref.numel()
    assert hooks.acc[1, "activation"].sat.sum().item() == (z.tanh().abs() >= 0.99).sum().item()
    assert hooks.acc[2, "weight_grad"].count.item() == 21


def test_interleaved_reports_failures_and_quantiles():
    import torch

    def boom() -> None:
        raise RuntimeError("nope")

    res, inner = interleaved(
        {"a": lambda: None, "b": boom}, repeats=3, warmup=1, device=torch.device("cpu")
    )
    assert res["a"].ok and len(res["a"].times) == 3 and inner == 1
    assert not res["b"].ok and "nope" in res["b"].error
    assert quantiles([1.0, 2.0, 3.0]) == (1.5, 2.0, 2.5)


def test_interleaved_times_apart_variants_last_in_every_round_then_settles(monkeypatch):
    import time

    import torch

    calls, sleeps = [], []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (sleeps.append((len(calls), s)), real_sleep(0)))
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "c1", "b", "c2")}
    res, _ = interleaved(
        fns,
        repeats=4,
        warmup=1,
        device=torch.device("cpu"),
        apart=frozenset({"c1", "c2"}),
        settle=0.5,
    )
    assert all(len(m.times) == 4 for m in res.values())
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 5  # the warm-up round, then one a repeat
    assert all(set(r[:2]) == {"a", "b"} and set(r[2:]) == {"c1", "c2"} for r in rounds)
    assert {tuple(r[:2]) for r in rounds} == {("a", "b"), ("b", "a")}  # still rotated
    assert sleeps == [(4 * (i + 1), 0.5) for i in range(5)]  # after each round's apart ones


def test_report_names_the_file_that_is_not_a_result(tmp_path):
    broken, other = tmp_path / "broken.json", tmp_path / "other.json"
    broken.write_text("{bad")
    other.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"broken\.json is not JSON"):
        report.load(broken)
    with pytest.raises(ValueError, match=r"other\.json is not a fastmlp bench result"):
        report.load(other)
    assert report.result_files(tmp_path) == []  # skipped when looking for results


def test_a_result_written_atomically_survives_a_writer_killed_mid_write(tmp_path, monkeypatch):
    import os

    from fastmlp.bench.command import write_text_atomically

    path = tmp_path / "result.json"
    write_text_atomically(path, '{"old": 1}\n')

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, '{"new": 2}\n')
    assert path.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left


def test_report_renders_gpu_document():
    """The GPU sections (graph/compiled ratios, kernel table, targets) render from JSON."""

    def row(variant, batch, med, **extra):
        return {
            "section": "main", "mode": "step", "dtype": "fp32", "batch": batch, "width": 1000,
            "depth": 5, "in_features": 1024, "out_features": 10, "variant": variant,
            "status": "ok", "median_s": med, "q25_s": med, "q75_s": med, **extra,
        }  # fmt: skip

    kernel = {
        "section": "kernel", "op": "forward", "dtype": "bf16", "m": 4096, "k": 4096, "n": 4096,
        "variant": "fastmlp-all", "status": "ok", "median_s": 1e-4, "q25_s": 1e-4,
        "q75_s": 1e-4, "tflops": 900.0, "vs_cublas": 0.9,
    }  # fmt: skip
    doc = {
        "schema": "fastmlp-bench/1",
        "timestamp": "t",
        "command": "python -m bench --quick --device cuda",
        "machine": {"device_type": "cuda", "gpu": "Some GPU", "cpu": "x", "cpu_cores": 1,
                    "torch": "2", "triton": "3"},
        "config": {"depth": 5},
        "rows": [
            row("plain", 256, 1e-3, ratio=1.0, ratio_compiled=1.2),
            row("plain-compiled", 256, 8e-4, ratio=0.8, ratio_compiled=1.0),
            row("fastmlp-all", 256, 9e-4, ratio=0.9, ratio_compiled=1.125),
            {**row("plain-graph", 256, 0), "status": "n/a", "reason": "capture failed"},
        ],
        "kernel_rows": [kernel],
    }  # fmt: skip
    md = report.render(doc)
    assert "step / plain-compiled" in md and "capture failed" in md
    assert "`fastmlp-all` / `plain`, batch 256 step fp32: 0.90 (met)" in md
    assert "`fastmlp-all` / `plain-compiled`, batch 256 step fp32: 1.12 (NOT met)" in md
    assert "4096x4096x4096 bf16: 0.90 (met)" in md and "tf32: n/a" in md


def test_a_crashing_variant_is_reported_not_fatal(monkeypatch):
    import torch
    from fastmlp.bench import suite, variants

    real = variants.build_variant

    def flaky(name, *args, **kwargs):
        if name == "hooks":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(suite, "build_variant", flaky)
    cfg = suite.BenchConfig(repeats=1, warmup=0, min_time=0.0)
    case = variants.Case(batch=4, width=8, depth=1, in_features=6, out_features=3)
    rows = suite.measure_case(
        "main", case, ["plain", "hooks"], ["step"], cfg, torch.device("cpu"), 1, log=lambda m: None
    )
    by = {r["variant"]: r for r in rows}
    assert by["plain"]["status"] == "ok"
    assert by["hooks"]["status"] == "n/a" and "simulated" in by["hooks"]["reason"]


def test_interleaved_drops_a_variant_that_recompiles_while_timed():
    import torch

    graphs = [0]

    def recompiling() -> None:
        graphs[0] += 1

    res, _ = interleaved(
        {"steady": lambda: None, "thrash": recompiling},
        repeats=3,
        warmup=1,
        device=torch.device("cpu"),
        recompiles=lambda: graphs[0],
        compiled=frozenset({"steady", "thrash"}),
    )
    assert res["steady"].ok and len(res["steady"].times) == 3
    assert not res["thrash"].ok and "recompiled 1 graph" in res["thrash"].error


def test_op_boundary_writes_json_per_width_and_batch(tmp_path, capsys):
    from fastmlp.bench import op_boundary

    argv = ["--batches", "2,3", "--widths", "4", "--repeats", "2", "--warmup", "1"]
    assert op_boundary.main([*argv, "--min-time", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("op-boundary-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["width"], r["batch"]) for r in rows] == [(4, 2), (4, 3)]
    for r in rows:
        assert r["op_calls_per_step"] == 12 and r["variants"]["op"]["ms"] > 0
    assert json.loads(path.read_text())["dispatch"]["op_us"] > 0
    with pytest.raises(SystemExit) as exit_:
        op_boundary.main(["--widths", "0", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --widths: expected integers >= 1, got '0'" in capsys.readouterr().err


def _computing_calls(fn, *args) -> list[tuple[str, int | None]]:
    """The PyTorch calls ``fn(*args)`` makes that compute something (``floor._computes``):
    (name, id of the first argument if it is a tensor)."""
    import torch
    from fastmlp.bench.floor import _computes
    from torch.overrides import TorchFunctionMode

    seen = []

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if _computes(func, result):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                seen.append((func.__qualname__, None if first is None else id(first)))
            return result

    with Log():
        fn(*args)
    return seen


def test_floor_replays_the_pytorch_calls_a_record_makes_on_its_new_tensors():
    import torch
    from fastmlp.bench.floor import CallTape

    from fastmlp.activations import get_activation
    from fastmlp.backends import cpu
    from fastmlp.stats import LayerStats
    from fastmlp.stats.layout import ACTIVATION

    g = torch.Generator().manual_seed(3)
    stats = LayerStats(get_activation("tanh"))
    bufs, settings = stats.buffers_tuple(), stats.settings()
    x0, x1, y = (torch.tanh(torch.randn(4000, generator=g)) for _ in range(3))
    cpu.record(bufs, settings, ACTIVATION, x0)  # calibrated: a steady record
    tape = CallTape()
    tape.capturing(cpu.record)(bufs, settings, ACTIVATION, x1)
    ((_, n),) = tape.tapes
    before = [t.clone() for t in stats.buffers()]

    replayed = _computing_calls(tape.replaying(cpu.record), bufs, settings, ACTIVATION, y)
    assert tape.recaptures == 0
    assert all(torch.equal(a, b) for a, b in zip(before, stats.buffers(), strict=True))
    real = _computing_calls(cpu.record, bufs, settings, ACTIVATION, y)
    assert [name for name, _ in replayed] == [name for name, _ in real] and len(real) == n
    assert {"_VariableFunctionsClass.aminmax", "_VariableFunctionsClass.bincount"} <= {
        name for name, _ in real
    }
    assert replayed[0][1] == id(y)  # on this call's tensor, not the captured one


def test_floor_captures_a_record_again_when_its_replay_fails():
    import torch
    from fastmlp.bench.floor import CallTape

    from fastmlp.activations import get_activation
    from fastmlp.backends import cpu
    from fastmlp.stats import LayerStats
    from fastmlp.stats.layout import ACTIVATION

    g = torch.Generator().manual_seed(4)
    stats = LayerStats(get_activation("tanh"))
    bufs, settings = stats.buffers_tuple(), stats.settings()
    narrow = [0.1 + 0.1 * torch.rand(4000, generator=g) for _ in range(2)]
    cpu.record(bufs, settings, ACTIVATION, narrow[0])
    tape = CallTape()
    tape.capturing(cpu.record)(bufs, settings, ACTIVATION, narrow[1])
    wide = torch.rand(4000, generator=g) * 2 - 1  # below the captured slots: bincount fails
    replay = tape.replaying(cpu.record)
    replay(bufs, settings, ACTIVATION, wide)
    assert tape.recaptures == 1
    tape.rewind()
    replay(bufs, settings, ACTIVATION, wide)  # the new capture fits
    assert tape.recaptures == 1


def test_floor_writes_json_with_the_replayed_variant(tmp_path, capsys):
    from fastmlp.bench import floor

    argv = ["--batches", "3", "--width", "8", "--repeats", "2", "--warmup", "1"]
    assert floor.main([*argv, "--min-time", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("floor-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert set(row["variants"]) == {"plain", "fastmlp-off", "fastmlp-all", "fastmlp-all-calls"}
    assert row["records_per_step"] == 24  # 6 layers: z, h, dz, dW
    assert row["calls_per_step"] > 4 * row["records_per_step"]
    assert all(v["ms"] > 0 and v["over_plain"] > 0 for v in row["variants"].values())
    assert "fastmlp-all-calls" in capsys.readouterr().out
    for bad, said in (
        (["--batches", "ten"], "argument --batches: expected comma-separated integers, got 'ten'"),
        (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
        (["--min-time", "nan"], "argument --min-time: expected a finite number >= 0, got 'nan'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            floor.main([*bad, "--out", str(tmp_path)])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
stepping\t: 0
flags\t\t: fpu sse sse2 sse4_2 avx avx2 fma

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
flags\t\t: avx512f
"""


def test_cpu_id_tells_two_cpus_of_one_model_name_apart(tmp_path):
    from fastmlp.bench.machine import cpu_id, cpu_summary, machine_slug

    for level, kind, size in ((1, "Data", "32K"), (2, "Unified", "512K"), (3, "Unified", "16384K")):
        d = tmp_path / f"index{level}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    ident = cpu_id(_CPUINFO, cache_dir=str(tmp_path))
    # the first processor's fields only; the best vector instruction set among its flags
    assert {k: ident[k] for k in ("vendor", "family", "model", "stepping", "isa", "l2", "l3")} == {
        "vendor": "AuthenticAMD",
        "family": "23",
        "model": "49",
        "stepping": "0",
        "isa": "AVX2",
        "l2": "512K",
        "l3": "16384K",
    }
    info = {"device_type": "cpu", "cpu": "AMD EPYC", "cpu_cores": 2, "cpu_id": ident}
    assert machine_slug(info) == "cpu-amd-epyc-f23m49-2c"
    assert cpu_summary(info) == "AMD EPYC (family 23 model 49, AVX2, L2 512K, L3 16384K)"
    doc = {"machine": info}
    assert report.machine_label(doc).endswith(", 2 cores")
    # results written before the numbers were recorded say so, and keep their file names
    old = {"device_type": "cpu", "cpu": "AMD EPYC", "cpu_cores": 2}
    assert machine_slug(old) == "cpu-amd-epyc-2c"
    assert "not recorded" in cpu_summary(old)
    # no /proc/cpuinfo (macOS, Windows): nothing made up
    bare = cpu_id("", cache_dir=str(tmp_path / "absent"))
    assert not {"vendor", "family", "model", "isa", "l2", "l3"} & set(bare)
