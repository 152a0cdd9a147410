"""Issue #25 part 4: no traceback reaches a user. Every command with bad arguments and bad files
ends in one line on stderr (exit 2 for usage errors, 1 for failures); -v adds the traceback;
every error the SDK raises is one of its own types."""
import subprocess
import sys

import numpy as np
import pytest

from msld_sdk.cli.main import main
from msld_sdk.errors import MsldError, UsageError


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "garbage.plan").write_bytes(b"PK not a zip")
    (tmp_path / "text.npy").write_text("no array here")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "afile").write_text("x")
    np.save(tmp_path / "ok.npy", np.zeros((16, 16), np.float32))
    return tmp_path


def _cases(t, plan):
    """(argv, expected exit status)"""
    seg = ["segment", "--steps", "1", "-q", "--plan", plan]
    return [
        ([], 2), (["nonsense"], 2), (["segment"], 2),
        (seg + [str(t / "missing.png"), "-o", str(t / "o1")], 1),
        (seg + [str(t / "garbage.png"), "-o", str(t / "o2")], 1),
        (seg + [str(t / "text.npy"), "-o", str(t / "o3")], 1),
        (seg + [str(t / "empty_dir"), "-o", str(t / "o4")], 1),
        (seg + [str(t / "ok.npy"), "-o", str(t / "afile")], 2),
        (seg + [str(t / "ok.npy"), "-k", "0"], 2),
        (seg + [str(t / "ok.npy"), "-k", "many"], 2),
        (seg + [str(t / "ok.npy"), "--threshold", "2"], 2),
        (seg + [str(t / "ok.npy"), "--center", "1"], 2),
        (seg + [str(t / "ok.npy"), "--center", "1", "2", "3"], 2),
        (seg + [str(t / "ok.npy"), "--slices", "0", "2", "-o", str(t / "o5")], 2),
        (seg + [str(t / "ok.npy"), "--views", "9", "-o", str(t / "o6")], 2),
        (seg + [str(t / "ok.npy"), str(t / "ok.npy"), "--views", "9", "-o", str(t / "o9")], 2),
        (seg + [str(t / "ok.npy"), "--seed", "-1", "-o", str(t / "o10")], 2),
        (seg + [str(t / "ok.npy"), "--seed", str(2**64), "-o", str(t / "o11")], 2),
        (seg + [str(t / "ok.npy"), "--eta", "2", "-o", str(t / "o12")], 2),
        (["listen", "--dest", "http://127.0.0.1:1/dicom-web", "--max-pending", "0"], 2),
        (["tune", "--plan", plan, "--seeds", "-1", "0"], 2),
        (["eval", "--plan", plan, "--seed", "-1"], 2),
        (seg + [str(t / "ok.npy"), "--backend", "cuda"], 2),
        (["segment", str(t / "ok.npy"), "--plan", str(t / "garbage.plan"), "-o", str(t / "o7")], 1),
        (["segment", str(t / "ok.npy"), "--plan", str(t / "no.plan"), "-o", str(t / "o8")], 1),
        (["info", str(t / "garbage.plan")], 1), (["info", str(t / "no.plan")], 1), (["info", "a", "b"], 2),
        (["build", str(t / "garbage.plan")], 1), (["build", plan, "--out", str(t / "empty_dir")], 2),
        (["build", plan, "--out", plan], 2), (["build", plan, "--k-max", "0"], 2),
        (["bench", "--plan", str(t / "garbage.plan"), "--repeats", "1"], 1),
        (["bench", "--plan", plan, "-k", "0"], 2),
        (["bench", "--plan", plan, "--image", str(t / "garbage.png"), "--repeats", "1", "-k", "1", "--steps", "1",
          "--no-int8-run", "-q"], 1),
        (["bench", "--plan", plan, "--json", str(t / "empty_dir")], 2),
        (["eval", "--plan", plan, "--k", "0"], 2),
        (["eval", "--plan", plan, "--data", str(t / "nowhere"), "--kind", "lidc"], 1),
        (["eval", "--plan", plan, "--cvc-fold", "9/2", "--kind", "cvc", "--data", str(t)], 1),
        (["eval", "--plan", plan, "--json", plan], 2),
        (["export"], 2), (["export", "--bogus"], 2), (["export", str(t / "garbage.png"), str(t / "x.plan")], 1),
        (["export", "--random", str(t / "empty_dir")], 2),
        (["export", str(t / "garbage.plan"), str(t / "x2.plan")], 1),          # a zip: "use msld import"
        (["export", str(t / "afile"), str(t / "x3.plan")], 1),                 # not safetensors
        (["export", str(t / "afile"), str(t / "x4.plan"), "--seed", "7"], 2),  # --seed without --random
        (["export", "--random", str(t / "x5.plan"), "--config", str(t / "afile")], 2),   # not a JSON config
        (["import"], 2), (["import", str(t / "garbage.png"), "--config", str(t / "afile"), "--out",
                           str(t / "y.plan")], 1),
        (["import", str(t / "garbage.png"), "--config", str(t / "afile"), "--out", str(t / "garbage.png")], 2),
    ]


def test_every_command_with_bad_arguments_and_files_prints_one_line(bad_files, tiny_plan, capsys):
    for argv, code in _cases(bad_files, str(tiny_plan)):
        got = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
        assert got == code, (argv, got, err)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith(("msld: error:", "msld ", "usage:")) or ": error: " in last, (argv, err)
    leftovers = [p for p in bad_files.rglob("*") if ".msld-tmp-" in p.name or p.name.endswith(".tmp")]
    assert not leftovers


def test_verbose_adds_the_traceback_and_an_unexpected_error_is_one_line(tmp_path, tiny_plan, monkeypatch, capsys):
    from msld_sdk import segmenter

    def broken(self, *a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(segmenter.Segmenter, "run", broken)
    np.save(tmp_path / "a.npy", np.zeros((16, 16), np.float32))
    argv = ["segment", str(tmp_path / "a.npy"), "--plan", str(tiny_plan), "-q", "-o", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "msld: error: KeyError: 'a bug' (an unexpected failure; run again with -v" in err
    assert main(argv + ["-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("and report it)")


def test_a_subprocess_sees_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "msld_sdk.cli", "segment", "x.png", "-k", "-3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument -k/--k: must be a positive integer, not -3" in r.stderr


def test_a_bad_backend_name_is_an_sdk_error_and_still_a_value_error(tiny_plan):
    from msld_sdk import Segmenter
    with pytest.raises(UsageError, match="backend must be one of") as e:
        Segmenter(tiny_plan, backend="cuda")
    assert isinstance(e.value, ValueError) and isinstance(e.value, MsldError)


def test_data_set_errors_are_sdk_errors():
    from msld_sdk.evaluation.datasets import load_split
    with pytest.raises(MsldError, match="kind must be one of"):
        load_split("imagenet", "/nowhere", "val", 32)
    with pytest.raises(ValueError):
        load_split("imagenet", "/nowhere", "val", 32)


def test_a_bad_run_option_with_several_inputs_is_one_usage_error(bad_files, tiny_plan, capsys):
    """Checked once against the plan before any input runs: one line and exit 2, not one failure
    per input and an output folder of error.json files."""
    out = bad_files / "many"
    ok = str(bad_files / "ok.npy")
    assert main(["segment", ok, ok, "--plan", str(tiny_plan), "--views", "9", "-q", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msld: error: msld segment: views") and "failed" not in err[0]
    assert not out.exists()


def test_segment_takes_inputs_and_options_in_any_order(bad_files, tiny_plan):
    """msld segment a -k 2 b --threshold 0: options between inputs (argparse's intermixed
    parsing), and a threshold of 0, which run() accepts, is accepted by the CLI too."""
    ok = str(bad_files / "ok.npy")
    out = bad_files / "mixed"
    assert main(["segment", ok, "-k", "2", ok, "--plan", str(tiny_plan), "--steps", "1", "--threshold", "0",
                 "-q", "-o", str(out)]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and all(len(list(f.glob("mask_*.png"))) == 2 for f in folders)

