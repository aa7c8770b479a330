"""Tests of run_config.py: which config changes a saved run refuses.

Resuming through the Checkpointer (refused and accepted changes, what config.json holds) is
tested in store/test_checkpoint.py.
"""
from byol_jax.store import run_config


def test_config_mismatches_rule():
  saved = {"model": {"width": 1.0, "stem": "imagenet"}, "num_steps": 10, "precision": "float32",
           "dataset": {"num_classes": 10, "data_dir": "a"}}
  current = {"model": {"width": 1.0, "stem": "small", "new_field": 3}, "num_steps": 20,
             "precision": "float32", "dataset": {"num_classes": 100, "data_dir": "b"}}
  reasons = run_config.STATE_DEFINING_FIELDS
  assert run_config.config_mismatches(saved, current) == [
      f"dataset.num_classes: saved 10, now 100 ({reasons['dataset.num_classes']})",
      f"model.new_field: saved <absent>, now 3 ({reasons['model.']})",
      f"model.stem: saved 'imagenet', now 'small' ({reasons['model.']})",
  ]
  assert run_config.config_mismatches(saved, saved) == []


def test_a_field_the_saved_run_predates_compares_as_its_schema_default():
  reasons = run_config.STATE_DEFINING_FIELDS
  saved = {"model": {"width": 1.0}}  # Written before model.padding existed.
  assert run_config.config_mismatches(saved, {"model": {"width": 1.0, "padding": "same"}}) == []
  assert run_config.config_mismatches(saved, {"model": {"width": 1.0, "padding": "symmetric"}}) == [
      f"model.padding: saved <absent: default 'same'>, now 'symmetric' ({reasons['model.']})"]


def test_an_old_workdir_with_a_legacy_zero_init_bool_resumes_under_the_new_default():
  saved = {"model": {"width": 1.0, "zero_init_residual": False}}
  assert run_config.config_mismatches(saved, {"model": {"width": 1.0,
                                                        "zero_init_residual": "authors"}}) == []
