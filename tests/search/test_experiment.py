from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from drcapsnet.errors import ConfigError
from search.experiment import (
    Experiment,
    ParamSpec,
    dump_experiment,
    experiment_from_dict,
    experiment_to_dict,
    load_experiment,
    load_yaml,
    parse_override,
)

GOOD = """\
name: t
model: {preset: tiny}
data: {dataset: digits, batch_size: 32}
train: {epochs: 2, lr: 5.0e-2}
search:
  space:
    train.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
    model.routing_iterations: {type: int, low: 1, high: 4}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """The issue lines of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    header, *lines = str(info.value).split("\n")
    assert header == f"{path}:"
    return [line.strip() for line in lines]


def base(**sections: object) -> dict:
    raw = yaml.safe_load(GOOD)
    raw.update(sections)
    return raw


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, GOOD))
    assert exp.name == "t" and exp.path == tmp_path / "exp.yaml"
    assert exp.run.model.conv_channels == 16 and exp.run.train.lr == 0.05
    assert exp.search.metric == "val_acc" and exp.search.mode == "max" and exp.search.sampler == "tpe"
    assert exp.search.space["train.lr"] == ParamSpec("float", 1e-3, 0.1, log=True)
    assert exp.search.space["model.routing_iterations"] == ParamSpec("int", 1, 4)
    assert exp.mlflow_experiment == "t" and exp.registered_model == "t-capsnet"


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_experiment(write(tmp_path, GOOD.replace("lr: 5.0e-2", "lrr: 0.01")))


def test_unknown_top_level_and_nested_keys(tmp_path: Path) -> None:
    text = GOOD.replace("search:\n", "search:\n  scheduler: {nam: asha}\n  sampller: tpe\n") + "trian: {}\n"
    found = problems(write(tmp_path, text))
    assert "trian: unknown key (did you mean 'train'?)" in found
    assert "search.scheduler.nam: unknown key (did you mean 'name'?)" in found
    assert "search.sampller: unknown key (did you mean 'sampler'?)" in found


def test_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    text = """\
name: bad name
model: {routing_iterations: 0, units: 0, routingg: dynamic}
data: {batch_size: 0}
train: {lr: fast, momentum: 1.5, optimizer: adamw}
search:
  metric: val_accuracy
  sampler: bayes
  space:
    train.lrr: {type: float, low: 0.1, high: 0.2}
"""
    found = problems(write(tmp_path, text))
    expected = [
        "name: must be letters",
        "model.routingg: unknown key (did you mean 'routing'?)",
        "model.units: must be an integer >= 1, got 0",
        "model.routing_iterations: must be an integer in [1, 10], got 0",
        "data.batch_size: must be an integer >= 1, got 0",
        "train.lr: expected a number, got 'fast'",
        "train.optimizer: must be one of sgd, adam, got 'adamw'",
        "train.momentum: must be a number in [0, 1), got 1.5",
        "search.metric: must be one of val_acc",
        "search.sampler: must be one of tpe, random, cmaes, gp, qmc, nsga2, got 'bayes'",
        "search.space.train.lrr: not a config field (did you mean 'train.lr'?)",
    ]
    for prefix in expected:
        assert any(line.startswith(prefix) for line in found), (prefix, found)
    assert len(found) == len(set(found)) == len(expected)


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    """YAML 1.2 floats: ``1e-3`` in a file or a --set is a number (PyYAML alone, YAML 1.1, reads it as text)."""
    exp = load_experiment(write(tmp_path, GOOD.replace("lr: 5.0e-2", "lr: 1e-3").replace("low: 1.0e-3", "low: 5E-4")),
                          ["train.momentum=9e-1"])
    assert exp.run.train.lr == 1e-3 and isinstance(exp.run.train.lr, float)
    assert exp.search.space["train.lr"].low == 5e-4
    assert exp.run.train.momentum == 0.9


def test_bad_enums_list_the_valid_values(tmp_path: Path) -> None:
    text = GOOD.replace("search:\n", "search:\n  mode: maximize\n  scheduler: {name: hyperband}\n")
    text = text.replace("model: {preset: tiny}", "model: {preset: huge, routing: em}")
    found = problems(write(tmp_path, text))
    assert "search.mode: must be one of max, min, got 'maximize'" in found
    assert "search.scheduler.name: must be one of asha, median, none, got 'hyperband'" in found
    assert "model.preset: must be one of paper, small, tiny, got 'huge'" in found
    assert "model.routing: must be one of dynamic, attention, got 'em'" in found


@pytest.mark.parametrize(("entry", "message"), [
    ("{type: float, low: 0.1, high: 0.1}", "search.space.train.lr: low must be < high, got low=0.1, high=0.1"),
    ("{type: float, low: 0.0, high: 0.1, log: true}", "search.space.train.lr.log: needs low > 0, got low=0.0"),
    ("{type: float, high: 0.1}", "search.space.train.lr.low: required for type float"),
    ("{type: categorical}", "search.space.train.lr.choices: required for type categorical, a non-empty list"),
    ("{type: categorical, choices: []}", "search.space.train.lr.choices: required for type categorical"),
    ("{type: float, low: 0.1, high: 0.2, choices: [1]}", "search.space.train.lr.choices: only for type categorical"),
    ("{type: float, low: 0.001, high: 0.1, log: true, step: 0.01}", "search.space.train.lr: log and step cannot"),
    ("{type: flot, low: 0.1, high: 0.2}", "search.space.train.lr.type: must be one of float, int, categorical"),
    ("{low: 0.1, high: 0.2}", "search.space.train.lr.type: required, one of float, int, categorical"),
    ("{type: float, low: 0.1, hihg: 0.2}", "search.space.train.lr.hihg: unknown key (did you mean 'high'?)"),
    ("[0.1, 0.2]", "search.space.train.lr: expected a mapping, got list"),
    ("{type: float, low: 0.01, high: 20.0}", "search.space.train.lr: high=20.0 is rejected: train.lr: must be a "
                                             "number in (0, 10], got 20.0"),
    ("{type: categorical, choices: [0.1, -1.0]}", "search.space.train.lr: choice -1.0 is rejected: train.lr:"),
])
def test_bad_space_entries(tmp_path: Path, entry: str, message: str) -> None:
    text = GOOD.replace("{type: float, low: 1.0e-3, high: 1.0e-1, log: true}", entry)
    found = problems(write(tmp_path, text))
    assert len(found) == 1 and found[0].startswith(message), found


def test_space_bounds_the_config_rejects_and_wrong_field_types(tmp_path: Path) -> None:
    text = GOOD.replace("high: 4}", "high: 12}") + (
        "    model.units: {type: float, low: 4.0, high: 8.0}\n"
        "    train.optimizer: {type: categorical, choices: [sgd, adamw]}\n"
        "    data.batch_size: {type: int, low: 0, high: 64}\n")
    found = problems(write(tmp_path, text))
    assert found == [
        "search.space.model.routing_iterations: high=12 is rejected: model.routing_iterations: must be an integer "
        "in [1, 10], got 12",
        "search.space.model.units: low=4.0 does not fit an integer field (use type: int)",
        "search.space.train.optimizer: choice 'adamw' does not fit this field (must be one of sgd, adam, got 'adamw')",
        "search.space.data.batch_size: low=0 is rejected: data.batch_size: must be an integer >= 1, got 0",
    ]


def test_space_is_required(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "name: t\n"))
    assert len(found) == 1 and found[0].startswith("search.space: required")


def test_enqueue_keys_must_be_in_the_space_and_values_in_range(tmp_path: Path) -> None:
    text = GOOD + "  enqueue:\n    - {train.lr: 1.0e-2, model.routing_iterations: 3}\n" \
                  "    - {train.lrr: 1.0e-2, model.routing_iterations: 9, train.lr: 1e-2}\n"
    found = problems(write(tmp_path, text))
    assert found == [
        "search.enqueue[1].train.lrr: not in search.space (did you mean 'train.lr'?)",
        "search.enqueue[1].model.routing_iterations: 9 is outside [1, 4]",
    ]


def test_overrides_are_applied_before_validation(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, GOOD), [
        "train.lr=3.0e-4", "train.epochs=7", "search.num_samples=2", "search.scheduler.name=none",
        "search.resources.gpu=0.5", "tracking.uri=http://mlflow:5000", "search.space.train.lr.high=0.5",
        "data.limit_train=100"])
    assert exp.run.train.lr == 3e-4 and exp.run.train.epochs == 7 and exp.run.data.limit_train == 100
    assert exp.search.num_samples == 2 and exp.search.scheduler.name == "none" and exp.search.resources.gpu == 0.5
    assert exp.tracking.uri == "http://mlflow:5000"
    assert exp.search.space["train.lr"] == ParamSpec("float", 1e-3, 0.5, log=True)


def test_bad_overrides_are_reported_like_bad_keys(tmp_path: Path) -> None:
    found = problems(write(tmp_path, GOOD), ("train.lrr=0.01", "train.epochs=many", "search.scheduler.grace_period=0",
                                             "nonsense"))
    assert found == [
        "--set 'nonsense': expected KEY=VALUE with a dotted key, e.g. train.lr=3.0e-4",
        "train.epochs: expected an integer, got 'many'",
        "train.lrr: unknown key (did you mean 'lr'?)",
        "search.scheduler.grace_period: must be an integer >= 1, got 0",
    ]


def test_preset_then_keys_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{preset: tiny}", "{preset: small, units: 12}"))
    exp = load_experiment(path)
    assert exp.run.model.conv_channels == 64 and exp.run.model.units == 12       # small, then the file's key
    exp = load_experiment(path, ["model.preset=tiny", "model.primary_types=2"])
    assert (exp.run.model.conv_channels, exp.run.model.conv_kernel) == (16, 5)    # tiny now
    assert exp.run.model.units == 12 and exp.run.model.primary_types == 2         # file key + override win
    assert load_experiment(path, ["model.preset=paper"]).run.model.decoder_hidden == (512, 1024)


def test_data_dir_is_resolved_against_the_file_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "experiments"
    sub.mkdir()
    path = write(sub, GOOD.replace("batch_size: 32}", "batch_size: 32, data_dir: ../data}"))
    monkeypatch.chdir("/")
    exp = load_experiment(path)
    assert exp.run.data.data_dir == str(tmp_path / "data") and os.path.isabs(exp.run.data.data_dir)
    monkeypatch.chdir(tmp_path)                      # a path typed with --set is relative to the cwd
    assert load_experiment(path, ["data.data_dir=cache"]).run.data.data_dir == str(tmp_path / "cache")
    raw = base(data={"dataset": "digits", "data_dir": "imgs"})
    assert experiment_from_dict(raw, base_dir=sub).run.data.data_dir == str(sub / "imgs")
    assert experiment_from_dict(raw).run.data.data_dir == str(tmp_path / "imgs")    # dicts: the cwd


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///runs/mlflow.db", "sqlite:///{cwd}/runs/mlflow.db"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("mlruns", "{cwd}/mlruns"),
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("databricks", "databricks"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
])
def test_tracking_uri_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    exp = experiment_from_dict(base(tracking={"uri": uri}))
    assert exp.tracking.uri == expected.format(cwd=tmp_path)


def test_file_level_errors_name_the_file(tmp_path: Path) -> None:
    for text, message in [("- a\n- b\n", "expected a mapping at the top level"), ("", "got an empty file"),
                          ("name: [unclosed\n", "YAML syntax error")]:
        path = write(tmp_path, text)
        with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + re.escape(message)):
            load_experiment(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the file"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"bad\.json: JSON syntax error"):
        load_experiment(write(tmp_path, "{'name': 1}", "bad.json"))


def test_name_is_required() -> None:
    raw = base()
    del raw["name"]
    with pytest.raises(ConfigError, match=r"<dict>:\n  name: required"):
        experiment_from_dict(raw)


@pytest.mark.parametrize(("text", "expected"), [
    ("train.lr=3.0e-4", ("train.lr", 3e-4)),
    ("train.lr=1e-3", ("train.lr", 1e-3)),            # YAML would say '1e-3': a user means the number
    ("train.lr=2E5", ("train.lr", 2e5)),
    ("train.epochs=3", ("train.epochs", 3)),
    (" model.preset = tiny ", ("model.preset", "tiny")),
    ("train.grad_clip=null", ("train.grad_clip", None)),
    ("train.grad_clip=", ("train.grad_clip", None)),
    ("train.bf16=false", ("train.bf16", False)),
    ("model.decoder_hidden=[64, 128]", ("model.decoder_hidden", [64, 128])),
    ("tracking.uri=http://host:5000/x", ("tracking.uri", "http://host:5000/x")),
    ("data.data_dir=a: [b", ("data.data_dir", "a: [b")),      # not YAML: kept as text
])
def test_parse_override(text: str, expected: tuple) -> None:
    key, value = parse_override(text)
    assert (key, value) == expected and type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override(text)


def full_experiment() -> Experiment:
    raw = base(
        model={"preset": "small", "decoder_hidden": [32, 64], "reconstruction_weight": 1e-05},
        data={"dataset": "idx", "data_dir": "/data/idx", "limit_train": 100},
        train={"lr": 1e-5, "grad_clip": 1.0, "weight_decay": 1.0e-7, "optimizer": "adam"},
        tracking={"uri": "http://mlflow:5000", "experiment": "e", "registered_model": "m"},
        result={"metrics": {"val_acc": 0.9}, "mlflow_run_id": "abc", "params": {"train.lr": 1e-5}},
    )
    raw["search"].update(sampler="qmc", mode="min", metric="val_loss", time_budget_s=60, storage="sqlite:////o.db",
                         scheduler={"name": "median", "grace_period": 3, "reduction_factor": 3},
                         resources={"cpu": 2, "gpu": 0.25}, enqueue=[{"train.lr": 1e-2}])
    raw["search"]["space"]["data.batch_size"] = {"type": "categorical", "choices": [16, 32]}
    raw["search"]["space"]["train.momentum"] = {"type": "float", "low": 0, "high": 0.9, "step": 0.1}
    return experiment_from_dict(raw)


def test_to_dict_round_trips() -> None:
    exp = full_experiment()
    raw = experiment_to_dict(exp)
    assert "preset" not in raw["model"] and raw["model"]["conv_channels"] == 64        # explicit, no preset
    assert experiment_from_dict(raw) == exp
    assert experiment_from_dict(json.loads(json.dumps(raw))) == exp                     # plain: JSON-able


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_dump_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    exp = full_experiment()
    path = dump_experiment(exp, tmp_path / f"out{suffix}")
    again = load_experiment(path)
    assert again == exp and again.path == path
    assert isinstance(again.run.train.lr, float) and again.run.train.lr == 1e-5
    assert isinstance(again.search.space["train.momentum"].low, float)


def test_the_loader_reads_every_float_spelling_a_user_or_a_dump_writes() -> None:
    values = [1e-5, 1e-3, 5e-4, 1e20, 0.1, 1.0, 1e-300, 123456.789]
    assert load_yaml(yaml.safe_dump({"v": values}))["v"] == values
    typed = load_yaml("a: 1e-05\nb: 2E5\nc: -1e+2\nd: 3\ne: 1e3x\nf: .5\ng: '1e-3'")
    assert typed == {"a": 1e-5, "b": 2e5, "c": -100.0, "d": 3, "e": "1e3x", "f": 0.5, "g": "1e-3"}
    assert isinstance(typed["d"], int)


def test_from_dict_does_not_change_its_input() -> None:
    raw = base(model={"preset": "tiny"})
    before = json.dumps(raw, sort_keys=True)
    experiment_from_dict(raw, overrides=["train.lr=0.2", "model.preset=small"])
    assert json.dumps(raw, sort_keys=True) == before


def test_resources_must_be_whole_above_one_and_result_a_mapping() -> None:
    raw = base(result=[1])
    raw["search"]["resources"] = {"gpu": 1.5, "cpu": -1}
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(raw)
    lines = str(info.value).split("\n  ")[1:]
    assert lines[0].startswith("search.resources.cpu: must be a number >= 0")
    assert lines[1].startswith("search.resources.gpu: must be a number >= 0, a fraction or a whole number, got 1.5")
    assert lines[2] == "result: expected a mapping, got list"


# (case id, file text, substrings of the one error line): valid YAML syntax that must still be refused
HOSTILE = [
    ("duplicate-key-flow", "name: t\ntrain: {lr: 0.1, lr: 0.2}\n", ["train.lr: given twice", "line 2, column 9",
                                                                      "line 2, column 18", "keep one"]),
    ("duplicate-key-block", "name: t\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
     ["train.lr: given twice", "line 3", "line 5"]),
    ("duplicate-top-level", "name: t\nname: u\n", ["name: given twice"]),
    ("duplicate-in-a-list", "name: t\nsearch:\n  enqueue:\n    - {train.lr: 0.1, train.lr: 0.2}\n",
     ["search.enqueue[0].train.lr: given twice"]),
    ("billion-laughs", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
     ["aliases expand to more than 100,000 values", "billion laughs"]),
    ("recursive-alias", "a: &x [1, *x]\n", ["refers to the node that contains it"]),
    ("nested-too-deep", "a: " + "[" * 5000 + "]" * 5000, ["line 1: nested more than 100 levels deep"]),
    ("json-nested-too-deep", "[" * 5000 + "]" * 5000, ["nested"]),
    ("json-duplicate-key", '{"name": "a", "name": "b"}', ["name: given twice in one JSON object"]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in HOSTILE], ids=[c for c, _, _ in HOSTILE])
def test_valid_yaml_that_lies_or_explodes_is_one_line_fast(tmp_path: Path, text: str, expected: list[str]) -> None:
    import time

    path = write(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for part in expected:
        assert part in message, (part, message)
    assert elapsed < 10, f"{elapsed:.2f} s"     # a hang guard: unchecked, the bomb expands to 387 million values


def test_merge_keys_and_shared_aliases_are_not_duplicates() -> None:
    assert load_yaml("base: &b {epochs: 2}\ntrain: {<<: *b, epochs: 3}") == {"base": {"epochs": 2},
                                                                            "train": {"epochs": 3}}
    assert load_yaml("t: &t {x: 1}\nr: {a: *t, b: *t}")["r"] == {"a": {"x": 1}, "b": {"x": 1}}


@pytest.mark.parametrize(("overrides", "expected"), [
    (("train.epochs=2", "search.scheduler.grace_period=2"), "search.scheduler.grace_period: 2 is not below "
                                                            "train.epochs (2), so asha would never stop a trial"),
    (("train.epochs=3", "search.scheduler.grace_period=5", "search.scheduler.name=median"), "so median would never"),
    (("train.epochs=1", "search.scheduler.grace_period=2"), "(1), so asha would never stop a trial; raise train"),
    (("name=" + "n" * 129,), "name: 'nnnnnnnnnnnnnnnnnnnn'... is 129 bytes long, at most 128"),
    (("tracking.experiment=" + "é" * 65,), "tracking.experiment: 'éééééééééééééééééééé'... is 130 bytes long"),
    (("tracking.registered_model=" + "m" * 200,), "tracking.registered_model: "),
])
def test_configs_that_lie_quietly_are_refused(tmp_path: Path, overrides: tuple[str, ...], expected: str) -> None:
    found = problems(write(tmp_path, GOOD), overrides)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("overrides", [("train.epochs=1",), ("train.epochs=2", "search.scheduler.grace_period=1"),
                                       ("train.epochs=2", "search.scheduler.grace_period=5",
                                        "search.scheduler.name=none"), ("name=" + "n" * 128,)])
def test_what_the_rules_still_accept(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    load_experiment(write(tmp_path, GOOD), overrides)    # 1 epoch with grace 1: no early stopping to promise
