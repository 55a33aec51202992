"""`mist-kit compare` on the digits demo data with test_vit: a row per (method, codec), the choice respects the
device and link constraints (on val only), a constraint nothing meets is one clear line with exit 1, rows are
resumable, Ctrl-C keeps finished rows, JSON keys are the documented ones, and the plot is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def compare_run(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", "--backbone", "test_vit", "--weights", str(tiny_weights), "--img-size", "32",
            "--train", str(digits_lists["train"]), "--val", str(digits_lists["val"]),
            "--test", str(digits_lists["test"]), "--methods", "linear,mist", "--codecs", "fp32,int8-channel",
            "--epochs", "2", "--out", str(out), "--cache-dir", str(Path(tiny_checkpoint["out"]) / "cache")]
    res = runner.invoke(app, [*args, "--json", "--plot", str(out / "compare.png")])
    assert res.exit_code == 0, res.output
    return {"args": args, "out": out, "report": json.loads(res.stdout)}


def test_a_row_per_method_and_codec_with_the_documented_keys(compare_run: dict) -> None:
    from mist_kit.compare import ROW_KEYS

    rows = compare_run["report"]["rows"]
    assert [(r["method"], r["codec"]) for r in rows] == [("linear", "fp32"), ("linear", "int8-channel"),
                                                         ("mist", "fp32"), ("mist", "int8-channel")]
    for r in rows:
        assert not r.get("error"), r
        assert set(ROW_KEYS) - {"error"} <= set(r), set(ROW_KEYS) - set(r)
        assert 0 < r["val_top1"] <= 1 and r["test_top1"] is not None
        assert r["inference_rss_mb"] > 0 and r["finetune_rss_mb"] > 0 and r["host_timing"] is True
    by = {(r["method"], r["codec"]): r for r in rows}
    # mist as `train` builds it by default: the gather [5, 64] and the final-norm cls token [1, 64]
    mist_fp32, mist_int8 = by[("mist", "fp32")]["bytes_per_image"], by[("mist", "int8-channel")]["bytes_per_image"]
    assert mist_fp32 == 4 * (5 + 1) * 64 == 4 * mist_int8
    assert by[("linear", "fp32")]["bytes_per_image"] == 4 * 64
    assert by[("mist", "fp32")]["k"] == by[("mist", "int8-channel")]["k"]  # one depth search per method
    assert by[("mist", "fp32")]["edge_macs_per_image"] > by[("linear", "fp32")]["edge_macs_per_image"]


def test_best_is_chosen_on_val_and_reproducible(compare_run: dict) -> None:
    report = compare_run["report"]
    fitting = [r for r in report["rows"] if r["fits"]]
    assert report["best"]["val_top1"] == max(r["val_top1"] for r in fitting)
    train_cmd, export_cmd = report["reproduce"]
    assert train_cmd.startswith("mist-kit train ") and f"--method {report['best']['method']}" in train_cmd
    assert f"--codec {report['best']['codec']}" in train_cmd and export_cmd.startswith("mist-kit export ")
    plot = compare_run["out"] / "compare.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_constraints_pick_within_them_from_the_kept_rows(compare_run: dict) -> None:
    res = runner.invoke(app, [*compare_run["args"], "--max-bytes", "300B", "--json"])
    assert res.exit_code == 0, res.output
    assert "resuming: 4 finished rows" in res.stderr  # nothing is retrained: the rows are kept on disk
    report = json.loads(res.stdout)
    best = report["best"]
    assert best["bytes_per_image"] <= 300 and best["fits"]
    over = [r for r in report["rows"] if r["bytes_per_image"] > 300]
    assert over and all(not r["fits"] and "--max-bytes" in r["why_not"] for r in over)


def test_a_constraint_nothing_meets_is_one_line_and_exit_1(compare_run: dict) -> None:
    res = runner.invoke(app, [*compare_run["args"], "--max-bytes", "10"])
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no (method, codec) fits rpi4") and "--max-bytes" in last
    assert "Traceback" not in res.output


def test_rows_made_with_other_settings_are_redone_not_reused(compare_run: dict, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "c"
    shutil.copytree(compare_run["out"], out)
    args = [*compare_run["args"], "--out", str(out), "--methods", "linear,mist", "--codecs", "fp32",
            "--k", "mist=2", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "mist@fp32: the kept row was made with other settings (depth None -> 2): redoing it" in res.stderr
    assert "linear@fp32: the kept row" not in res.stderr  # same settings: kept
    rows = {(r["method"], r["codec"]): r for r in json.loads(res.stdout)["rows"]}
    assert rows[("mist", "fp32")]["k"] == 2 and rows[("mist", "fp32")]["settings"]["depth"] == 2
    assert rows[("linear", "fp32")] == {**compare_run["report"]["rows"][0], "fits": rows[("linear", "fp32")]["fits"],
                                        "why_not": rows[("linear", "fp32")]["why_not"]}


def test_fixed_depth_names_a_compared_method(tmp_path: Path) -> None:
    base = ["compare", "--train", "t.txt", "--val", "v.txt", "--out", str(tmp_path / "o"), "--methods", "mist"]
    res = runner.invoke(app, [*base, "--k", "vitsplit=9"])
    assert res.exit_code == 2 and "'vitsplit' is not one of --methods" in res.stderr
    res = runner.invoke(app, [*base, "--k", "mist"])
    assert res.exit_code == 2 and "METHOD=INT" in res.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_keeps_finished_rows(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import mist_kit.compare as compare

    real = compare._one_row
    calls: list[str] = []

    def interrupt_second(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "_one_row", interrupt_second)
    args = ["compare", "--backbone", "test_vit", "--weights", str(tiny_weights), "--img-size", "32",
            "--train", str(digits_lists["train"]), "--val", str(digits_lists["val"]), "--methods", "linear",
            "--codecs", "fp32,int8-channel", "--epochs", "1", "--out", str(tmp_path / "c"),
            "--cache-dir", str(Path(tiny_checkpoint["out"]) / "cache")]
    res = runner.invoke(app, args)
    assert res.exit_code == 130 and "1 finished rows kept" in res.stderr
    lines = (tmp_path / "c" / "rows.jsonl").read_text().splitlines()
    assert [json.loads(x)["codec"] for x in lines] == ["fp32"]


def test_bad_arguments_fail_before_any_work(tmp_path: Path) -> None:
    base = ["compare", "--train", "t.txt", "--val", "v.txt", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*base, "--methods", "lora"])
    assert res.exit_code == 2 and "unknown edge method 'lora'" in res.stderr
    res = runner.invoke(app, [*base, "--codecs", "int3"])
    assert res.exit_code == 2 and "int3" in res.stderr
    res = runner.invoke(app, [*base, "--max-bytes", "lots"])
    assert res.exit_code == 2 and "--max-bytes" in res.stderr
    assert not (tmp_path / "o").exists()
