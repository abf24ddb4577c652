"""Property-based fuzzing (hypothesis) of `arena eval` overrides: whatever is typed, the harness
answers with a result or a one-line `UserError` (exit status 2), never a traceback.

Two properties. The broad one feeds arbitrary overrides (known and unknown keys, group options
valid and not, every value type, sweeps, +/~/++ prefixes, raw junk) to the CLI's own validation,
Hydra composition and the evaluator's planning (everything that runs before any work). The
end-to-end one runs the real `arena eval` command on tiny settings with the knobs that are cheap
whatever their value. Examples are derandomized (reproducible in CI); ARENA_FUZZ_RANDOM=1 explores
new ones and ARENA_FUZZ_EXAMPLES=N runs more.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attacks  # noqa: F401  (registers attacks)
import defenses  # noqa: F401  (registers defenses)
from harness.cli.dispatch import main
from harness.core.errors import UserError
from harness.evasion.plan import plan_evaluation
from harness.cli.hydra_app import CONF_DIR, group_options, to_plain, validate_overrides

EXAMPLES = int(os.environ.get("ARENA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("ARENA_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["seed", "batch_size", "n_samples", "offset", "shard", "device", "progress", "threat.eps", "threat.norm",
        "evaluator.draws", "evaluator.cascade", "leaderboard.update", "defense.train.epochs", "defense.train.lr",
        "defense.train.optimizer", "defense.train.schedule", "defense.train.augment", "defense.train.batch_size",
        "model.width", "model.mean", "model.std", "dataset.path", "dataset.num_classes", "dataset.root", "attack.steps",
        "attack.loss", "attack.step_size", "attack.restarts", "attack.random_start", "attack.eot", "suite.attacks",
        "suite.name", "defense.weights", "defense.model_file", "nosuch", "defense.nosuch", "threat", "evaluator"]
GROUPS = ["dataset", "model", "defense", "suite", "threat", "attack", "launcher"]
CHEAP_DATASETS = ["digits", "npz", "cifar10", "svhn", "nope"]  # planning loads the data: keep it fast

SPECIAL = st.sampled_from(["null", "true", "false", "[]", "{}", "''", "\"\"", "???", "${seed}", "${nope}", "0/0", "1/2",
                           "nan", "inf", "-inf", "1e400", "-0", "cuda:7", "Linf", "L2", "ce", "[1,2]", "{a:1}",
                           "a,b", "range(0,3)", "choice(1,2)", "interval(0,1)", "glob(*)", "${oc.env:HOME}", "\\", "=", ","])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    SPECIAL,
    TEXT,
    st.lists(st.integers(-5, 5).map(str), max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
)


@st.composite
def override(draw) -> str:
    kind = draw(st.sampled_from(["value", "value", "value", "group", "group", "prefixed", "junk"]))
    if kind == "group":
        group = draw(st.sampled_from(GROUPS))
        pool = CHEAP_DATASETS if group == "dataset" else group_options(group) + ["nope", "null"]
        return f"{group}={draw(st.sampled_from(pool))}"
    if kind == "junk":
        return draw(TEXT)
    key, value = draw(st.sampled_from(KEYS)), draw(VALUES)
    if kind == "prefixed":
        prefix = draw(st.sampled_from(["+", "++", "~"]))
        return f"~{key}" if prefix == "~" else f"{prefix}{key}={value}"
    return f"{key}={value}"


def plan(overrides: list[str], multirun: bool) -> None:
    """What `arena eval [-m] overrides` does before any work: validate, compose, plan."""
    validate_overrides("eval", overrides, multirun=multirun)
    if multirun:
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_plain(compose(config_name="eval", overrides=overrides))
    plan_evaluation(cfg)


@FUZZ
@given(st.lists(override(), max_size=4), st.booleans())
def test_any_overrides_give_a_plan_or_a_one_line_user_error(tmp_path_factory, fuzzed, multirun):
    work = tmp_path_factory.getbasetemp() / "fuzz-plan"
    overrides = ["dataset=digits", "n_samples=20", f"work_dir={work}", *fuzzed]
    try:
        plan(overrides, multirun)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message


CHEAP = {
    "seed": st.one_of(st.integers(-3, 3).map(str), SPECIAL, TEXT),
    "threat.eps": st.one_of(st.floats(-1, 2).map(repr), SPECIAL),
    "threat.norm": st.one_of(st.sampled_from(["Linf", "L2", "L1", "linf"]), SPECIAL),
    "evaluator.draws": st.one_of(st.integers(-1, 3).map(str), SPECIAL),
    "evaluator.cascade": st.one_of(st.booleans().map(str), SPECIAL),
    "batch_size": st.one_of(st.integers(-2, 12).map(str), SPECIAL),
    "shard": st.one_of(st.sampled_from(["0/1", "0/2", "1/2", "2/2", "0/50"]), SPECIAL),
    "offset": st.one_of(st.integers(-2, 400).map(str), SPECIAL),
    "attack.loss": st.one_of(st.sampled_from(["ce", "margin", "dlr", "hinge"]), SPECIAL),
    "attack.restarts": st.one_of(st.integers(-1, 2).map(str), SPECIAL),
    "attack.step_size": st.one_of(st.floats(-1, 3).map(repr), SPECIAL),
    "attack.random_start": st.one_of(st.booleans().map(str), SPECIAL),
    "device": st.one_of(st.sampled_from(["cpu", "auto", "cuda", "tpu", "cpu:0"]), SPECIAL),
}


@settings(FUZZ, max_examples=max(4, EXAMPLES // 6))
@given(st.dictionaries(st.sampled_from(sorted(CHEAP)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda keys: st.tuples(*[CHEAP[k].map(lambda v, k=k: f"{k}={v}") for k in keys])))
def test_the_real_command_exits_0_or_2_with_one_line(tmp_path_factory, fuzzed):
    work = tmp_path_factory.getbasetemp() / "fuzz-run"
    argv = ["eval", "dataset=digits", "n_samples=10", "defense.train.epochs=1", "attack=pgd", "attack.steps=2",
            "leaderboard.update=false", "progress=false", f"work_dir={work}", *fuzzed]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert code in (0, 2), (code, text)
    if code == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("arena eval: error: "), text
