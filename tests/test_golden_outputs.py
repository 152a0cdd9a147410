"""Outputs stay bit-identical across refactors: every case of ``tests/golden_cases.py`` is rerun
and compared with the arrays stored before the change (``tests/data/golden_outputs/``, one file per
kind of machine).

Float results depend on ONNX Runtime's kernels, which differ by version and instruction set, so
the comparison runs where those match the machine that made a file and is skipped, with the
reason, elsewhere.
"""
import json

import numpy as np
import pytest

import golden_cases as gc

FILES = sorted(gc.GOLDEN_DIR.glob("*.npz"))


def _facts(path):
    with np.load(path) as f:
        return json.loads(str(f["facts"]))


@pytest.fixture(scope="module")
def stored():
    """The arrays made on this kind of machine (skips elsewhere, naming the kinds that have a file)."""
    here = gc.machine_facts()
    path = gc.golden_path(here)
    if not path.exists():
        pytest.skip(f"no golden arrays for this machine ({here}); files exist for {[p.name for p in FILES]}")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    assert json.loads(str(arrays["facts"])) == here, f"{path.name} holds arrays of another machine"
    return arrays


@pytest.mark.parametrize("case", gc.cases(), ids=lambda c: c[0])
def test_outputs_bit_identical(case, stored):
    name, plan, seg_kwargs, images, run_kwargs = case
    results = gc.run_case(plan, seg_kwargs, images, run_kwargs)
    stored_n = len({k.split("/")[1] for k in stored if k.startswith(name + "/")})
    assert len(results) == stored_n
    for i, r in enumerate(results):
        for key, value in gc.record(r).items():
            want = stored[f"{name}/{i}/{key}"]
            if key.endswith(".sum"):
                assert float(value) == float(want), f"{name}[{i}] {key}: {float(value)!r} != {float(want)!r}"
            else:
                np.testing.assert_array_equal(value, want, err_msg=f"{name}[{i}] {key}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_file_covers_every_case(path):
    with np.load(path) as f:
        names = {k.split("/")[0] for k in f.files if k != "facts"}
    assert names == {c[0] for c in gc.cases()}
    assert gc.golden_path(_facts(path)) == path, "file name does not match the machine facts inside"


def test_there_is_a_golden_file():
    assert FILES, f"no golden arrays in {gc.GOLDEN_DIR}"
