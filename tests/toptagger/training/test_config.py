"""The one training declaration: the pipeline's parameters map onto it, and nothing drifts from it.

``TrainConfig`` declares every setting; ``TrainConfig.from_pipeline`` lists the pipeline's training
parameters. The train component, the pipeline, ``python -m pipelines.run`` and
``python -m toptagger.training`` must all follow them: each test here fails when one drifts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing

import pytest

from components import train as train_component
from pipelines import run as local_runner
from pipelines.top_tagging import top_tagging
from toptagger.errors import ConfigError
from toptagger.images import ImageConfig
from toptagger.training.__main__ import build_parser
from toptagger.training.config import PIPELINE_PARAMETERS, TrainConfig, add_arguments, from_arguments, to_arguments

PIPELINE = {
    "image_size": 32,
    "epochs": 1,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "seed": 0,
    "base_model_uri": "",
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "max_steps_per_epoch": 0,
    "patience": 2,
}
KFP_TYPES = {int: "Integer", float: "Float", str: "String", bool: "Boolean"}


def test_train_config_maps_the_pipeline_split() -> None:
    config = TrainConfig.from_pipeline(**PIPELINE)
    assert config.test_fraction == 0 and config.val_fraction == pytest.approx(0.15 / 0.85)
    assert config.weights is None and config.max_steps_per_epoch is None and config.image.image_size == 32
    assert TrainConfig.from_pipeline(**PIPELINE | {"base_model_uri": "s3://b/w.pt"}).weights == "s3://b/w.pt"
    with pytest.raises(ConfigError, match="max_steps_per_epoch must be >= 0"):
        TrainConfig.from_pipeline(**PIPELINE | {"max_steps_per_epoch": -1})
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig.from_pipeline(**PIPELINE | {"learning_rate": 0})


def _declared_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig.from_pipeline)
    return {name: hints[name] for name in PIPELINE_PARAMETERS}


def test_the_train_component_takes_exactly_the_declared_parameters() -> None:
    hints = typing.get_type_hints(train_component.train)
    component = {name: hints[name] for name in inspect.signature(train_component.train).parameters}
    declared = _declared_types()
    assert {name: component[name] for name in declared} == declared
    # Everything else the component takes is about where it runs, not about training.
    others = set(component) - set(declared)
    assert others == {"fit_jets", "checkpoint_root", "run_key", "pipeline_run_id", "model", "metrics"}


def test_the_pipeline_exposes_the_declared_parameters_with_their_types() -> None:
    inputs = top_tagging.component_spec.inputs
    for name, kind in _declared_types().items():
        assert name in inputs, f"the pipeline lacks training parameter {name}"
        assert inputs[name].type == KFP_TYPES[kind], name
        assert inputs[name].description, f"pipeline parameter {name} has no description for the KFP UI"


def test_the_local_runner_offers_every_pipeline_parameter_with_the_pipelines_defaults() -> None:
    parser = local_runner.build_parser()
    actions = {action.dest: action for action in parser._actions}
    inputs = top_tagging.component_spec.inputs
    # checkpoint_root follows --state; every other parameter has a flag.
    assert set(inputs) - set(actions) == {"checkpoint_root"}
    local_defaults = {"deploy_target", "http_port", "grpc_port", "dataset_uri"}  # documented local choices
    for name in set(inputs) - {"checkpoint_root"} - local_defaults:
        assert actions[name].default == inputs[name].default, name
    args = parser.parse_args([])
    config = TrainConfig.from_pipeline(**{name: getattr(args, name) for name in PIPELINE_PARAMETERS})
    assert config.image.image_size == inputs["image_size"].default


def test_the_cli_has_a_flag_for_every_setting_and_maps_back_to_the_config() -> None:
    parser = build_parser()
    flags = {action.dest for action in parser._actions}
    settings = {f.name for f in dataclasses.fields(ImageConfig)} | {
        f.name for f in dataclasses.fields(TrainConfig) if f.name != "image"
    }
    assert settings <= flags
    args = parser.parse_args(["--data", "x.h5", "--out", "run", "--image-size", "48", "--no-rotate", "--lr", "0.01"])
    config = from_arguments(args)
    assert config == dataclasses.replace(
        TrainConfig(), image=dataclasses.replace(TrainConfig().image, image_size=48, rotate=False), lr=0.01
    )
    assert from_arguments(parser.parse_args(["--data", "x.h5", "--out", "run"])) == TrainConfig()


def _other_value(spec: dataclasses.Field, default: object) -> object:
    """A valid value of the field that is not its default."""
    if spec.metadata.get("choices"):
        return next(choice for choice in spec.metadata["choices"] if choice != default)
    kind = str(spec.type)
    if kind == "bool":
        return not default
    if kind in ("int", "int | None"):
        return (default or 0) + 3
    if kind == "float":
        return default / 3 + 0.01  # not a short decimal: the flag must carry every bit
    if kind in ("str", "str | None"):
        return "s3://bucket/other file.h5"
    raise AssertionError(f"no test value for field {spec.name} of type {kind}")


def test_to_arguments_reproduces_every_field() -> None:
    parser = build_parser()
    base = ["--data", "x.h5", "--out", "run"]
    default = TrainConfig()
    assert from_arguments(parser.parse_args(base + to_arguments(default))) == default
    image_values = {f.name: _other_value(f, getattr(default.image, f.name)) for f in dataclasses.fields(ImageConfig)}
    train_values = {
        f.name: _other_value(f, getattr(default, f.name)) for f in dataclasses.fields(TrainConfig) if f.name != "image"
    }
    changed = dataclasses.replace(default, image=dataclasses.replace(default.image, **image_values), **train_values)
    # every field differs from its default, so the round trip covers each one
    assert all(getattr(changed.image, k) != getattr(default.image, k) for k in image_values)
    assert all(getattr(changed, k) != getattr(default, k) for k in train_values)
    flags = to_arguments(changed)
    assert from_arguments(parser.parse_args(base + flags)) == changed
    # the flags stand on their own: a parser with other defaults reads the same config from them
    other = argparse.ArgumentParser()
    add_arguments(other, defaults=TrainConfig(seed=99, amp="off", image=ImageConfig(image_size=8)))
    assert from_arguments(other.parse_args(flags)) == changed
