"""The settings sections: validated where declared, documented, and budget-aware where the issue asked for it."""

import pytest
from pydantic import ValidationError

from toolchain.settings import SECTIONS, BenchConfig, DataConfig, DistillConfig, ExportConfig, TrainingConfig


@pytest.mark.parametrize("key", SECTIONS)
def test_every_field_is_described(key):
    for name, field in SECTIONS[key].model_fields.items():
        assert field.description and len(field.description) > 10, f"{key}.{name}"


def test_warm_up_follows_the_length_of_the_run():
    # the README's own example: 65,536 tokens at 8 x 256 per step is 32 steps; the warm-up must end well before that
    assert TrainingConfig(tokens=65536).warmup_for(32) == 2
    assert TrainingConfig(tokens=65536, warmup_fraction=0.25).warmup_for(32) == 8
    assert TrainingConfig(steps=10, warmup_steps=40).warmup_for(10) == 10  # an explicit count is kept, capped at the run
    assert TrainingConfig(steps=1000, warmup_steps=40).warmup_for(1000) == 40


@pytest.mark.parametrize("model, fields, message", [
    (DataConfig, {"eval_fraction": 0.6, "calibration_fraction": 0.5}, "must be below 1"),
    (TrainingConfig, {"tokens": 10, "steps": 10}, "not both"),
    (TrainingConfig, {"lr": 1e-5, "min_lr": 1e-4}, "min_lr must not exceed lr"),
    (DistillConfig, {"logit_loss_weight": 0}, "needs a positive logit_loss_weight"),
    (DistillConfig, {"intermediate_loss": "cosine"}, "together"),
    (BenchConfig, {"max_error_rate": 1.5}, "less than or equal to 1"),
])
def test_contradictions_are_refused_where_declared(model, fields, message):
    with pytest.raises(ValidationError, match=message):
        model(**fields)


def test_export_dtype_defaults_per_format():
    assert ExportConfig(format="onnx").resolved_dtype() == "float32"
    assert ExportConfig(format="trtllm").resolved_dtype() == "bfloat16"
    assert ExportConfig(format="hf", dtype="float16").resolved_dtype() == "float16"


def test_distill_shares_the_training_loop_settings():
    distill = DistillConfig(tokens=1024, lr=3e-4, temperature=2.0)
    assert distill.training() == TrainingConfig(tokens=1024, lr=3e-4)
