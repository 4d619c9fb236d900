"""config.py: the knobs of issue 8 (loss.sft_weight, β / learning-rate schedules, eval sampling), how they parse
from YAML and --set, and the one-line errors for bad values."""

from __future__ import annotations

import pytest

from spin_diffusion.config import LossConfig, load_config
from spin_diffusion.errors import SpinDiffusionError


def test_sft_weight_defaults_to_off_and_parses():
    assert load_config(None).loss.sft_weight == 0.0
    assert load_config(None, ["loss.sft_weight=1250"]).loss.sft_weight == 1250.0
    assert LossConfig(objective="dpo", sft_weight=0.5).sft_weight == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.sft_weight=-1"], "loss.sft_weight must be >= 0, got -1.0"),
        (["loss.sft_weight=.nan"], "loss.sft_weight must be >= 0, got nan"),
        (["loss.sft_weight=abc"], "loss.sft_weight must be a number; got 'abc'"),
        (["loss.objective=sft", "loss.sft_weight=1"], "objective sft already is that loss (set loss.sft_weight=0)"),
    ],
)
def test_bad_sft_weight_is_a_one_line_error(overrides, message):
    with pytest.raises(SpinDiffusionError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
