import json
import subprocess
import sys

import pytest

import posbias
from posbias.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "alibi " in out and "toeplitz,linear" in out
    assert main(["list", "nothing*"]) == 1


def test_show(capsys):
    assert main(["show", "alibi", "--heads", "12", "--length", "3"]) == 0
    out = capsys.readouterr().out
    assert "0.70710678" in out and "head 11" in out
    assert (
        main(
            [
                "show",
                "alibi",
                "--heads",
                "2",
                "--param",
                "schedule=geometric",
                "--param",
                "max_bias=4",
            ]
        )
        == 0
    )
    assert "schedule='geometric'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "alibii"], "Did you mean 'alibi'"),
        (["show", "alibi", "--heads", "0"], "num_heads must be >= 1"),
        (["parity", "--backends", "mxnet"], "unknown backend"),
        (["parity", "--backends", "numpy", "--dtypes", "float8"], "unknown dtype(s) ['float8']"),
    ],
)
def test_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parity_json(tmp_path, capsys):
    path = tmp_path / "parity.json"
    code = main(["parity", "--backends", "numpy", "--head-counts", "1,3", "--json", str(path)])
    assert code == 0
    captured = capsys.readouterr()
    assert "bias cells:" in captured.out and "FAIL" not in captured.out
    assert "posbias parity" in captured.err and "cell" in captured.err  # tqdm progress bar
    assert "summary (" in captured.out
    report = json.loads(path.read_text())
    assert {c["variant"] for c in report["cells"]} == set(posbias.list_biases())
    assert all(c["passed"] for c in report["cells"])


@pytest.mark.parametrize("jobs", ["0", "two"])
def test_parity_jobs_must_be_a_positive_integer(capsys, jobs):
    with pytest.raises(SystemExit) as exit_info:
        main(["parity", "--jobs", jobs])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_parity_exit_code_on_failure(capsys, isolated_registry):
    from test_parity import Untiled

    posbias.register("test/untiled")(Untiled)
    code = main(["parity", "--backends", "numpy", "--variants", "test/untiled", "--quiet"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_module():
    out = subprocess.run(
        [sys.executable, "-m", "posbias", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"posbias {posbias.__version__}"


def test_parity_includes_attention_layers(tmp_path, capsys):
    from conftest import FRAMEWORKS

    if not FRAMEWORKS:
        pytest.skip("no framework under test")
    path = tmp_path / "parity.json"
    argv = [
        "parity",
        "--backends",
        FRAMEWORKS[0],
        "--variants",
        "alibi",
        "--head-counts",
        "3",
        "--dtypes",
        "float32",
        "--json",
        str(path),
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "attention parity" in out and "MultiHeadAttention" in out
    report = json.loads(path.read_text())
    kinds = {c["dtype"] for c in report["attention_cells"]}
    assert kinds == {"float32 attention()", "float32 MultiHeadAttention"}
    assert all(c["passed"] for c in report["attention_cells"])


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t5.png"
    assert main(["plot", "t5", "--heads", "2", "--length", "8", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "plot",
                "swin",
                "--heads",
                "2",
                "--param",
                "window=[2, 2]",
                "-o",
                str(tmp_path / "swin.png"),
            ]
        )
        == 0
    )


def test_comm_closed_forms(tmp_path, capsys):
    out = tmp_path / "comm.json"
    argv = ["comm", "--no-measure", "--lengths", "64,128", "--heads", "4", "--kv-heads", "2"]
    assert main([*argv, "--dim", "8", "--json", str(out)]) == 0
    assert "naive / ring" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    # ring: 3 steps x 2 (K, V) x B·H_kv·(L/4)·D x 2 bytes; naive: 3/4 of the float32 bias
    assert [r["ring"] for r in rows] == [3 * 2 * 2 * 16 * 8 * 2, 3 * 2 * 2 * 32 * 8 * 2]
    assert rows[0]["naive_bias"] == 4 * 64 * 64 * 4 * 3 // 4
