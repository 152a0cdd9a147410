"""Issue #25 part 5: one consistent CLI: --version, the same flag names for the same things on
every command, every option with help and its default shown, help that matches the parser, and
inputs of several kinds told apart per input (a folder of PNGs read as images)."""
import argparse
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msld_sdk import __version__
from msld_sdk.cli.main import build_parser, main
from msld_sdk.cli.options import Formatter
from msld_sdk.outputs import expand_inputs, input_kind

SHARED = {"segment": ["-k", "--k", "-o", "--out", "--seed", "--threads", "--steps", "--threshold", "--overwrite"],
          "eval": ["-k", "--k", "-o", "--out", "--seed", "--threads", "--steps", "--threshold", "--overwrite"],
          "bench": ["-k", "--k", "-o", "--out", "--seed", "--threads", "--steps", "--overwrite"],
          "build": ["-o", "--out", "--overwrite"]}


def _subparsers():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return ap, sub.choices


def _torch_side_parsers():
    """export's and import's parsers, as their main() builds them (caught at parse_args)."""
    from msld_export.plan_writing import export_plan
    from msld_export.reference import importer
    got = {}
    for name, mod in (("export", export_plan), ("import", importer)):
        orig = argparse.ArgumentParser.parse_args

        def grab(self, *a, _name=name, **k):
            got[_name] = self
            raise SystemExit(0)
        argparse.ArgumentParser.parse_args = grab
        try:
            with pytest.raises(SystemExit):
                mod.main([])
        finally:
            argparse.ArgumentParser.parse_args = orig
    return got


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"msld {__version__}"


def test_same_flags_on_every_command():
    _, cmds = _subparsers()
    for cmd, flags in SHARED.items():
        have = {s for a in cmds[cmd]._actions for s in a.option_strings}
        assert not set(flags) - have, (cmd, set(flags) - have)
    for name, p in _torch_side_parsers().items():
        have = {s for a in p._actions for s in a.option_strings}
        assert {"-o", "--out", "--overwrite"} <= have, name


def test_every_option_has_help_and_shows_its_default():
    _, cmds = _subparsers()
    parsers = dict(cmds, **_torch_side_parsers())
    for name, p in parsers.items():
        if not p.add_help:        # the placeholders of export/import in msld's own parser
            continue
        assert p.formatter_class is Formatter, name
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert a.help, (name, a.option_strings)
            if a.required:        # nothing to default to
                continue
            shown = fmt._expand_help(a) if a.help else ""
            assert "default" in shown.lower(), (name, a.option_strings, shown)


def test_center_help_matches_the_parser(tmp_path, capsys):
    _, cmds = _subparsers()
    text = cmds["segment"].format_help()
    assert "--center X Y [Z]" in text and "X Y [Z] ..." not in text and "One centre" in text
    for bad in (["1"], ["1", "2", "3", "4"], ["1", "2", "3", "4", "5", "6"]):
        with pytest.raises(SystemExit) as e:
            cmds["segment"].parse_args(["x.png", "--center", *bad])
        assert e.value.code == 2
        assert "--center takes one centre: X Y, or X Y Z" in capsys.readouterr().err
    assert cmds["segment"].parse_args(["x.png", "--center", "1", "2"]).center == [1.0, 2.0]


def test_eval_k_zero_is_refused_and_k_is_an_alias(capsys):
    assert main(["eval", "--k", "0"]) == 2
    assert "argument -k/--k: must be a positive integer, not 0" in capsys.readouterr().err
    _, cmds = _subparsers()
    assert cmds["eval"].parse_args(["-k", "3"]).k == 3 and cmds["eval"].parse_args(["--k", "3"]).k == 3


def test_export_takes_out_as_option_or_positional(tmp_path):
    import json
    from msld_export.model.config import tiny_config
    from msld_sdk.plan import Plan
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert main(["export", "--random", "--config", str(cfg), str(tmp_path / "a.plan")]) == 0
    assert main(["export", "--random", "--config", str(cfg), "-o", str(tmp_path / "b.plan")]) == 0
    assert Plan.open(tmp_path / "a.plan").graphs_sha256 == Plan.open(tmp_path / "b.plan").graphs_sha256
    assert main(["export", "--random", "--config", str(cfg), str(tmp_path / "c.plan"), "--out",
                 str(tmp_path / "d.plan"), str(tmp_path / "e.plan")]) == 2


def test_help_of_every_command_in_a_subprocess():
    for cmd in (["--help"], ["segment", "--help"], ["eval", "--help"], ["bench", "--help"], ["build", "--help"],
                ["info", "--help"], ["export", "--help"], ["import", "--help"]):
        r = subprocess.run([sys.executable, "-m", "msld_sdk.cli", *cmd], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stderr, (cmd, r.stderr)


# ---- inputs of several kinds, told apart per input --------------------------------------------
def test_input_kinds(tmp_path):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(pngs / f"s{i}.png")
    (pngs / "notes.txt").write_text("")
    (tmp_path / "v.nii.gz").write_bytes(b"")
    (tmp_path / "e").mkdir()
    assert input_kind(pngs) == "images" and input_kind(pngs / "s0.png") == "image"
    assert input_kind(tmp_path / "v.nii.gz") == "volume" and input_kind(tmp_path / "e") == "series"
    assert expand_inputs([str(pngs), str(tmp_path / "v.nii.gz")]) == [
        (str(pngs / "s0.png"), "image"), (str(pngs / "s1.png"), "image"), (str(tmp_path / "v.nii.gz"), "volume")]
    pytest.importorskip("pydicom")
    from ct_series import phantom, write_series
    write_series(tmp_path / "ct", phantom(n_slices=2, rows=20, cols=20))
    assert input_kind(tmp_path / "ct") == "series"


def test_a_folder_of_pngs_among_the_inputs_is_read_as_images(tmp_path, tiny_plan, capsys):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20), 60 * i, np.uint8)).save(pngs / f"s{i}.png")
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(tmp_path / "one.png")
    out = tmp_path / "out"
    assert main(["segment", str(pngs), str(tmp_path / "one.png"), "--plan", str(tiny_plan), "-k", "1", "--steps",
                 "1", "--seed", "0", "-q", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["one", "s0", "s1"]
    assert all((out / n / "overlay.png").exists() for n in ("one", "s0", "s1"))
    assert "no DICOM" not in capsys.readouterr().err
