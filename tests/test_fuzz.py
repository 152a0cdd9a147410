"""Bounded fuzzing in CI: damaged plans and arbitrary image bytes/arrays raise only documented errors.
The long run (100k+ inputs per target) is scripts/fuzz.py; its figures are in the README."""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft

N = int(os.environ.get("MSLD_FUZZ_EXAMPLES", "300"))
cfg = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def seed_plan(tiny_plan):
    return tiny_plan.read_bytes()


@cfg
@given(st.binary(max_size=4096))
def test_plan_reader_random_bytes(data):
    ft.plan_target(data)


@cfg
@given(data=st.binary(min_size=0, max_size=64))
def test_plan_reader_mutated_plans(seed_plan, data):
    ft.plan_mutation_target(seed_plan, data)


@cfg
@given(data=st.one_of(st.binary(max_size=512), st.text(max_size=300).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                   lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=4))
                      .map(lambda v: __import__("json").dumps(v).encode())))
def test_manifest_fuzz(seed_plan, data):
    ft.manifest_target(seed_plan, data)


@cfg
@given(st.binary(max_size=2048))
def test_image_file_bytes(data):
    ft.image_file_target(data)


@cfg
@given(st.binary(min_size=4, max_size=512))
def test_image_arrays(data):
    ft.image_array_target(data)


_CKPT_SEED: list = []


@pytest.mark.parametrize("target", ["random_bytes", "mutated_checkpoint", "fuzzed_pickle"])
@cfg
@given(data=st.binary(max_size=1024))
def test_checkpoint_reader(target, data):
    """msld import's restricted checkpoint reader: only CheckpointError, never a crash or code run."""
    if not _CKPT_SEED:
        _CKPT_SEED.append(ft.seed_checkpoint_bytes())
    seed = _CKPT_SEED[0]
    if target == "random_bytes":
        ft.checkpoint_target(data)
    elif target == "mutated_checkpoint":
        ft.checkpoint_mutation_target(seed, data[:64])
    else:
        ft.pickle_target(seed, data[:256])
