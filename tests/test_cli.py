import json
import subprocess
import sys

import pytest

import posbias
from posbias.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    flags = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    # the flags say what symmetric_slopes() says, not a class attribute
    assert flags["alibi"] == "toeplitz,symmetric_slopes"
    assert flags["alibi_scaled"] == "symmetric_slopes"  # its first parity example: scale only
    assert flags["alibi_learned"] == "toeplitz,learnable"  # learned slopes: none static
    assert flags["alibi_asymmetric"] == "toeplitz"
    assert main(["list", "nothing*"]) == 1


def test_show_reports_symmetric_slopes_per_instance(capsys):
    assert main(["show", "alibi_scaled", "--heads", "2", "--length", "2"]) == 0
    assert "symmetric_slopes=True" in capsys.readouterr().out
    assert main(["show", "alibi_scaled", "--heads", "2", "--param", "train_length=4"]) == 0
    assert "symmetric_slopes=False" in capsys.readouterr().out


def test_module_docstring_lists_every_command():
    import posbias.cli
    from posbias.cli import build_parser

    commands = next(
        a.choices for a in build_parser()._actions if a.dest == "command"
    )  # the subparsers
    assert len(commands) == 6
    first = posbias.cli.__doc__.splitlines()[0]
    for name in commands:
        assert f"``{name}``" in first, name
        assert f"    posbias {name}" in posbias.cli.__doc__, name


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
        (["show", "alibi", "--heads", "0"], "expected a positive integer, got 0"),
        (["parity", "--backends", "mxnet"], "unknown backend"),
        (["parity", "--backends", "numpy", "--dtypes", "float8"], "unknown dtypes ['float8']"),
    ],
)
def test_errors_are_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["parity", "--dtypes", "float8"], "unknown dtypes ['float8']"),
        (["comm", "--devices", "0"], "expected a positive integer, got 0"),
        (["plot", "alibi", "-o", "/nonexistent/dir/x.png"], "does not exist"),
        (["bench", "--only", "99"], "unknown targets ['99']"),
        (["comm", "--lengths", "1001", "--no-measure"], "do not split into 8 equal chunks"),
        (["show", "alibi", "--length", "-2"], "expected a positive integer, got -2"),
        (["show", "alibi", "--length", "0"], "expected a positive integer, got 0"),
        (["parity", "--variants", "alibbi"], "Did you mean 'alibi'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_nothing_else(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert message in err, err
    assert out == ""  # no header printed before the error


def test_parity_rejects_an_unknown_variant_before_importing_frameworks():
    code = (
        "import sys; from posbias.cli import main; rc = main(['parity', '--variants', 'alibbi']);"
        "print(rc, sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_list_treats_a_bare_word_as_a_substring(capsys):
    assert main(["list", "kerple"]) == 0
    out = capsys.readouterr().out
    assert "kerple_log" in out and "kerple_power" in out


def test_show_and_plot_agree_on_2d_biases(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["show", "alibi_2d", "--length", "4", "--heads", "2"]) == 0
    assert "2x2 grid" in capsys.readouterr().out
    from posbias.plot import plot_bias

    fig = plot_bias(posbias.get("alibi_2d", num_heads=1), length=32, path=tmp_path / "a.png")
    assert "6x6 grid" in fig._suptitle.get_text()


@pytest.mark.parametrize("output", ["x.txt", "folder/"])
def test_plot_needs_an_image_file_name(tmp_path, output, capsys):
    (tmp_path / "folder").mkdir()
    assert main(["plot", "alibi", "-o", str(tmp_path / output)]) == 2
    assert ".png, .pdf or .svg" in capsys.readouterr().err


def test_list_is_case_insensitive(capsys):
    assert main(["list", "KERPLE"]) == 0
    assert "kerple_log" in capsys.readouterr().out
