"""One check of a store's split settings against the ingest's (`shards.ingest.split_change`): the reason the ingest
gives for writing a store again and the dry run's "every shard's spec changes" come from it, so they cannot differ."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from shards.ingest import CAPTURE_CHANGED, IngestConfig, _changed, split_change

CONFIG = IngestConfig(held_out_sequences=1, held_out_camera="222200037")
SAME = {"held_out_camera": "222200037", "held_out_sequences": ["EXP-9"]}


@pytest.mark.parametrize("attrs, expected", [
    (SAME, None),
    ({**SAME, "held_out_camera": "220700191"}, r"--ingest.held-out-camera changed \(220700191 -> 222200037\)"),
    ({**SAME, "held_out_sequences": ["EXP-8", "EXP-9"]}, r"--ingest.held-out-sequences changed \(2 -> 1\)"),
    ({**SAME, "held_out_sequences": "EXP-9"}, r"--ingest.held-out-sequences changed \(the store records 'EXP-9', "
                                              r"not a list of sequences -> 1\)"),
    ({"held_out_sequences": ["EXP-9"]}, r"--ingest.held-out-camera changed \(None -> 222200037\)"),
])
def test_split_change_names_the_setting(attrs, expected):
    change = split_change(attrs, CONFIG)
    if expected is None:
        assert change is None
    else:
        assert change is not None and re.fullmatch(expected, change)
    assert _changed(SimpleNamespace(attrs=attrs), CONFIG) == (change or CAPTURE_CHANGED)


def test_a_held_out_list_that_is_no_list_is_a_change_for_the_ingest_too():
    """`_changed` used to ignore it (and said the capture changed) where the dry run counted it as a split change."""
    assert _changed(SimpleNamespace(attrs={**SAME, "held_out_sequences": 1}), CONFIG).startswith(
        "--ingest.held-out-sequences changed")
