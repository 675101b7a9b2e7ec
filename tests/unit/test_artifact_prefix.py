"""The per-step artifact prefix: readable, and different for different steps (issue 9, item 5).

The runtime clears leftover outputs before it runs, so two steps sharing a prefix lose each other's
outputs: the mapping from identity to prefix must be injective.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_remote_ml.core.artifacts import MAX_SEGMENT, ArtifactStore, decode_segment, encode_segment
from airflow_remote_ml.core.identity import StepIdentity

# Run ids that earlier versions folded onto one folder (every unsafe character became '_').
COLLIDING_RUN_IDS = [
    ("manual__2024-05-01T12:00:00+00:00", "manual__2024-05-01T12_00_00+00_00"),
    ("backfill:2024~1", "backfill_2024_1"),
    ("a/b", "a_b"),
    ("run.", "run"),
    ("..", "_"),
    ("", "_"),
    ("café", "caf_"),
]


@pytest.mark.parametrize(("first", "second"), COLLIDING_RUN_IDS)
def test_run_ids_that_differ_only_in_unsafe_characters_get_different_prefixes(tmp_path, first, second):
    store = ArtifactStore(str(tmp_path))
    a = StepIdentity("dag", "train", first)
    b = StepIdentity("dag", "train", second)
    assert store.step_prefix(a) != store.step_prefix(b)
    assert store.output_uri(a, "model") != store.output_uri(b, "model")


def test_the_prefix_stays_readable(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ident = StepIdentity("dag", "train", "manual__2024-05-01T12:00:00+00:00", 2, generation=1)
    assert store.step_prefix(ident) == str(tmp_path / "dag" / "manual__2024-05-01T12~3A00~3A00+00~3A00" / "train"
                                           / "map_2" / "gen_1")
    # Safe run ids, such as those of the default run-id pattern with ':' replaced, keep their layout.
    plain = StepIdentity("dag", "train", "scheduled__2024-05-01T12_00_00", 2, generation=1)
    assert store.step_prefix(plain) == str(tmp_path / "dag" / "scheduled__2024-05-01T12_00_00" / "train"
                                           / "map_2" / "gen_1")


@pytest.mark.parametrize("value", ["..", ".", ".hidden", "x/../../etc", "a\\b", "a\x00b", " "])
def test_a_segment_never_climbs_out_of_its_folder(value):
    segment = encode_segment(value)
    assert "/" not in segment and "\\" not in segment and "\x00" not in segment
    assert segment not in (".", "..") and not segment.startswith(".")


def test_a_long_value_is_cut_with_a_hash_and_stays_distinct():
    long_a, long_b = "r" * 500 + "a", "r" * 500 + "b"
    assert len(encode_segment(long_a)) <= MAX_SEGMENT
    assert encode_segment(long_a) != encode_segment(long_b)
    assert decode_segment(encode_segment(long_a)) is None  # cut: only the hash tells them apart


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text())
def test_encoding_round_trips(value):
    segment = encode_segment(value)
    if len(segment) < MAX_SEGMENT - 18:
        assert decode_segment(segment) == value


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(max_size=80), st.text(max_size=80))
def test_encoding_is_injective(a, b):
    if a != b:
        assert encode_segment(a) != encode_segment(b)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.tuples(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30), st.text(max_size=40),
                 st.integers(-1, 5), st.integers(0, 3)),
       st.tuples(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30), st.text(max_size=40),
                 st.integers(-1, 5), st.integers(0, 3)))
def test_different_identities_never_share_a_prefix(a, b):
    store = ArtifactStore("s3://bucket/ml")
    if a != b:
        assert store.step_prefix(StepIdentity(*a)) != store.step_prefix(StepIdentity(*b))
