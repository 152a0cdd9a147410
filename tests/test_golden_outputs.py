"""Outputs stay bit-identical across refactors: every case of ``tests/golden_cases.py`` is rerun
and compared with the arrays stored before the change (``tests/data/golden_outputs.npz``).

Float results depend on ONNX Runtime's kernels, which differ by version and instruction set, so
the comparison runs where those match the machine that made the file and is skipped, with the
reason, elsewhere.
"""
import json

import numpy as np
import pytest

import golden_cases as gc

STORED = np.load(gc.GOLDEN)
FACTS = json.loads(str(STORED["facts"]))


@pytest.fixture(scope="module")
def same_machine_kind():
    here = gc.machine_facts()
    if here != FACTS:
        pytest.skip(f"golden arrays were made with {FACTS}; this machine is {here}")


@pytest.mark.parametrize("case", gc.cases(), ids=lambda c: c[0])
def test_outputs_bit_identical(case, same_machine_kind):
    name, plan, seg_kwargs, images, run_kwargs = case
    results = gc.run_case(plan, seg_kwargs, images, run_kwargs)
    stored_n = len({k.split("/")[1] for k in STORED if k.startswith(name + "/")})
    assert len(results) == stored_n
    for i, r in enumerate(results):
        for key, value in gc.record(r).items():
            want = STORED[f"{name}/{i}/{key}"]
            if key.endswith(".sum"):
                assert float(value) == float(want), f"{name}[{i}] {key}: {float(value)!r} != {float(want)!r}"
            else:
                np.testing.assert_array_equal(value, want, err_msg=f"{name}[{i}] {key}")


def test_golden_file_covers_every_case():
    names = {k.split("/")[0] for k in STORED if k != "facts"}
    assert names == {c[0] for c in gc.cases()}
