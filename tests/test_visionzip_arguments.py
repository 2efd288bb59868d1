"""``visionzip(model, ...)``, the library entry: each bad argument is refused in one line naming the
argument, its value and what it accepts, on every family, and the model is left as it was."""

from __future__ import annotations

import pytest

from visionzip_core import visionzip
from visionzip_core.config import read_visionzip_config
from visionzip_core.families import FAMILIES, family_for

# keyword arguments -> what the one line must hold: the argument as given, and what it accepts.
BAD_ARGUMENTS = [
    (
        {"dominant_ratio": 1.5, "contextual_ratio": 0.05},
        "visionzip(dominant_ratio=1.5)",
        "a number in (0, 1]",
    ),
    (
        {"dominant_ratio": 0.45, "contextual_ratio": 1.0},
        "visionzip(contextual_ratio=1.0)",
        "a number in [0, 1)",
    ),
    ({"dominant": 0, "contextual": 2}, "visionzip(dominant=0)", "an integer >= 1"),
    ({"dominant": 4, "contextual": -1}, "visionzip(contextual=-1)", "an integer >= 0"),
    ({"dominant": 2.5, "contextual": 2}, "visionzip(dominant=2.5)", "an integer >= 1"),
    ({"dominant": 4, "contextual": 2, "merge": "avg"}, "visionzip(merge='avg')", "'paper' or 'mean'"),
    ({"dominant": 4, "contextual": 2, "keep_cls": "maybe"}, "visionzip(keep_cls='maybe')", "True or False"),
    (
        {"dominant": 4, "contextual": 2, "feature_layer": "last"},
        "visionzip(feature_layer='last')",
        "an integer",
    ),
    ({"dominant": 4, "contextual": 2, "feature_layer": 99}, "feature_layer=99", "allowed"),
    ({"dominant_ratio": 0.45}, "dominant_ratio", "together"),
    ({"dominant_ratio": 0.9, "contextual_ratio": 0.2}, "dominant_ratio + contextual_ratio", "<= 1"),
    ({"config": {"dominant": 4}}, "visionzip(config=...)", "a VisionZipConfig"),
]


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_each_bad_argument_is_one_line_naming_it(family, family_dirs):
    model = family_for(family).load(str(family_dirs[family]))
    for arguments, named, accepts in BAD_ARGUMENTS:
        with pytest.raises(ValueError) as err:
            visionzip(model, **arguments)
        message = str(err.value)
        assert len(message.splitlines()) == 1, (arguments, message)
        assert named in message and accepts in message, (arguments, message)
        assert read_visionzip_config(model.config) is None  # nothing applied
    both = {"dominant": 0, "contextual": -1}  # two bad arguments: both named, still one line
    with pytest.raises(
        ValueError, match=r"^visionzip\(dominant=0\): .*; visionzip\(contextual=-1\): [^\n]*$"
    ):
        visionzip(model, **both)
