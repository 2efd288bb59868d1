"""Narrow filters for library warnings a user of this trainer can do nothing about.

Each filter names one message (and its category and the module it is reported from); every other
warning still shows. Installed where the warning comes from, not globally at import.
"""

from __future__ import annotations

import contextlib
import warnings

# transformers 5.x deprecates ``PreTrainedModel.is_gradient_checkpointing``; peft 0.21's
# ``PeftModel.__init__`` still reads it, once per rank, whatever the config says.
_IS_GRADIENT_CHECKPOINTING = r"`is_gradient_checkpointing` is deprecated"
# torch 2.13 deprecates ``all_gather_into_tensor``; DeepSpeed 0.19.8's ZeRO gathers with it on every
# step of a multi-process run, and the warning shows once per rank.
_ALL_GATHER_INTO_TENSOR = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


@contextlib.contextmanager
def peft_wrapping():
    """Around ``get_peft_model``: without the ``is_gradient_checkpointing`` FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_IS_GRADIENT_CHECKPOINTING, category=FutureWarning)
        yield


def ignore_zero_collective_deprecation() -> None:
    """For the rest of the process: without the ``all_gather_into_tensor`` FutureWarning that
    DeepSpeed's ZeRO triggers through torch's c10d logger wrapper."""
    warnings.filterwarnings(
        "ignore",
        message=_ALL_GATHER_INTO_TENSOR,
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
