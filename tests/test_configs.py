"""Command-line overrides of config dataclasses: parsing by annotation, nested configs, dicts and errors."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metasel import configs, train
from metasel_experiments import gsnr_sweep, mts_benchmark


@dataclasses.dataclass(frozen=True)
class Inner:
  rate: float = 0.1
  name: str = "inner"


@dataclasses.dataclass(frozen=True)
class Settings:
  count: int = 1
  rate: float = 0.5
  flag: bool = False
  name: str = "x"
  label: str | None = "y"
  limit: int | None = None
  sizes: tuple[int, ...] = (1, 2)
  names: tuple[str, ...] = ("a",)
  rates: tuple[float, ...] = (0.5,)
  pair: tuple[int, float] = (1, 2.0)
  number: int | float = 1
  options: dict = dataclasses.field(default_factory=lambda: {"a": {"b": 1}})
  table: dict[str, int] | None = None
  inner: Inner = Inner()
  maybe_inner: Inner | None = None
  step: str | Callable = "sgd"
  weights: list[float] = dataclasses.field(default_factory=list)
  hook: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Unresolved:
  count: int = 1
  thing: "NoSuchType" = None  # noqa: F821 (a name that is defined nowhere)
  inner: "NoSuchInner" = Inner()  # noqa: F821


def _set(*overrides, config=None):
  return configs.apply_overrides(Settings() if config is None else config, list(overrides))


# parse_override


def test_parse_override_splits_the_key_path_at_dots_and_the_value_at_the_first_equals():
  assert configs.parse_override("a.b.c=value") == (("a", "b", "c"), "value")
  assert configs.parse_override("path=/tmp/x=y.txt") == (("path",), "/tmp/x=y.txt")
  assert configs.parse_override("name=") == (("name",), "")


@pytest.mark.parametrize("text", ["count", "warmup.epochs"])
def test_parse_override_without_equals_is_an_error(text):
  with pytest.raises(ValueError, match="has no '='; expected KEY=VALUE"):
    configs.parse_override(text)


@pytest.mark.parametrize("text", ["=3", "a..b=1", ".a=1", "a.=1"])
def test_parse_override_with_an_empty_key_part_is_an_error(text):
  with pytest.raises(ValueError, match="empty key part"):
    configs.parse_override(text)


# scalars


def test_ints_parse_and_non_integers_are_rejected_naming_field_type_and_text():
  assert _set("count=3").count == 3
  assert _set("count= -7 ").count == -7
  with pytest.raises(ValueError, match=r"count expects an int, got '3\.5'"):
    _set("count=3.5")
  with pytest.raises(ValueError, match="count expects an int, got 'abc'"):
    _set("count=abc")


def test_floats_accept_ints_decimals_and_exponents():
  assert _set("rate=3").rate == 3.0 and isinstance(_set("rate=3").rate, float)
  assert _set("rate=0.25").rate == 0.25
  assert _set("rate=1e-3").rate == 1e-3
  with pytest.raises(ValueError, match="rate expects a float, got 'fast'"):
    _set("rate=fast")


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("YES", True), ("1", True),
    ("false", False), ("FALSE", False), ("no", False), ("0", False),
])
def test_bools_accept_the_usual_words_in_any_case(text, expected):
  assert _set(f"flag={text}", config=Settings(flag=not expected)).flag is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", "on"])
def test_other_bool_words_are_rejected(text):
  with pytest.raises(ValueError, match=r"flag expects a bool \(true/false, 1/0, yes/no\)"):
    _set(f"flag={text}")


def test_strings_are_kept_as_given():
  assert _set("name=/tmp/x.txt").name == "/tmp/x.txt"
  assert _set("name=3").name == "3"
  assert _set("name=").name == ""


def test_optional_fields_take_none_or_null_in_any_case_else_the_inner_type():
  assert _set("label=none").label is None
  assert _set("label=NULL").label is None
  assert _set("label=z").label == "z"
  assert _set("limit=5").limit == 5
  assert _set("limit=None", config=Settings(limit=5)).limit is None
  with pytest.raises(ValueError, match="limit expects an int, got 'x'"):
    _set("limit=x")


def test_unions_try_their_supported_members_in_order():
  assert _set("number=4").number == 4 and isinstance(_set("number=4").number, int)
  assert _set("number=0.5").number == 0.5
  with pytest.raises(ValueError, match="number expects int or float, got 'big'"):
    _set("number=big")
  assert _set("step=momentum").step == "momentum"  # str | Callable: the str member


# tuples


def test_tuples_parse_comma_separated_or_json_lists_elementwise():
  assert _set("sizes=16,32,64").sizes == (16, 32, 64)
  assert _set("sizes= 16 , 32 ").sizes == (16, 32)
  assert _set("sizes=[16, 32]").sizes == (16, 32)
  assert _set("sizes=8").sizes == (8,)
  assert _set("sizes=").sizes == ()
  assert _set("sizes=[]").sizes == ()
  assert _set("names=mixture,digits-synthetic").names == ("mixture", "digits-synthetic")
  assert _set('names=["a,b", "c"]').names == ("a,b", "c")
  assert _set("rates=1,0.5").rates == (1.0, 0.5)
  assert _set("pair=3,0.5").pair == (3, 0.5)


def test_tuple_errors_name_the_element_and_the_expected_shape():
  with pytest.raises(ValueError, match=r"sizes\[1\] expects an int, got 'b'"):
    _set("sizes=1,b")
  with pytest.raises(ValueError, match="empty element"):
    _set("sizes=1,,2")
  with pytest.raises(ValueError, match="not a valid JSON list"):
    _set("sizes=[1, 2")
  with pytest.raises(ValueError, match=r"pair expects 2 values \(tuple\[int, float\]\), got 3"):
    _set("pair=1,2,3")
  with pytest.raises(ValueError, match=r"pair\[0\] expects an int, got '1.5'"):
    _set("pair=1.5,2")


# nested dataclasses


def test_nested_dataclass_fields_are_set_through_the_dotted_path():
  config = _set("inner.rate=0.75", "inner.name=b")
  assert config.inner == Inner(rate=0.75, name="b")
  assert Settings().inner == Inner()


def test_a_whole_dataclass_field_cannot_be_given_a_value():
  with pytest.raises(ValueError, match="inner is a Inner .*set its fields instead: inner.rate, inner.name"):
    _set("inner=3")


def test_an_optional_nested_dataclass_can_be_set_to_none_but_not_entered_while_none():
  assert _set("maybe_inner=none", config=Settings(maybe_inner=Inner())).maybe_inner is None
  assert _set("maybe_inner.rate=2", config=Settings(maybe_inner=Inner())).maybe_inner == Inner(rate=2.0)
  with pytest.raises(ValueError, match="maybe_inner is None, not a Inner"):
    _set("maybe_inner.rate=2")


def test_the_real_gsnr_sweep_config_takes_nested_train_config_overrides():
  config = gsnr_sweep.get_config(quick=True)
  new = configs.apply_overrides(
      config, ["warmup.epochs=2", "warmup.learning_rate=none", "warmup.optimizer=sgd", "trace.track_dynamics=false"]
  )
  assert new.warmup == dataclasses.replace(config.warmup, epochs=2, learning_rate=None, optimizer="sgd")
  assert new.trace == dataclasses.replace(config.trace, track_dynamics=False)
  assert isinstance(new.warmup, train.TrainConfig)
  assert dataclasses.replace(new, warmup=config.warmup, trace=config.trace) == config


def test_the_real_gsnr_sweep_config_takes_scalar_optional_and_tuple_overrides():
  config = gsnr_sweep.get_config(quick=True)
  new = configs.apply_overrides(
      config, ["seeds=3,4,5", "hidden=[64, 64]", "dataset=mixture", "inner_learning_rate=0.05", "num_batches=8"]
  )
  assert (new.seeds, new.hidden, new.dataset) == ((3, 4, 5), (64, 64), "mixture")
  assert (new.inner_learning_rate, new.num_batches) == (0.05, 8)
  assert configs.apply_overrides(new, ["dataset=null"]).dataset is None


# dict fields


def test_dict_entries_are_set_by_key_path_with_json_values():
  config = _set(
      "options.n=200", "options.frac=0.5", "options.on=true", "options.off=null",
      "options.list=[1, 2]", 'options.obj={"x": 1}', 'options.quoted="7"',
  )
  assert config.options == {
      "a": {"b": 1}, "n": 200, "frac": 0.5, "on": True, "off": None, "list": [1, 2], "obj": {"x": 1}, "quoted": "7",
  }


def test_dict_entries_fall_back_to_the_string_when_not_json():
  config = _set("options.path=/tmp/x.txt", "options.name=digits-synthetic", "options.spec=csv:a.csv")
  assert config.options["path"] == "/tmp/x.txt"
  assert config.options["name"] == "digits-synthetic"
  assert config.options["spec"] == "csv:a.csv"


def test_nested_dict_entries_create_and_merge_dicts_without_touching_the_original():
  original = Settings()
  before = copy.deepcopy(original.options)
  config = _set("options.a.c=2", "options.new.deep.n=3", config=original)
  assert config.options == {"a": {"b": 1, "c": 2}, "new": {"deep": {"n": 3}}}
  assert original.options == before


def test_later_overrides_win():
  assert _set("count=2", "count=3").count == 3
  assert _set("options.a.b=2", "options.a.b=5").options["a"]["b"] == 5


def test_a_whole_dict_is_replaced_by_a_json_object():
  assert _set('options={"n_real": 5}').options == {"n_real": 5}
  assert _set("options={}").options == {}
  with pytest.raises(ValueError, match="options expects a JSON object"):
    _set("options=[1, 2]")
  with pytest.raises(ValueError, match="options expects a JSON object"):
    _set("options=n_real")


def test_an_optional_dict_starts_empty_and_can_be_cleared():
  assert _set("table.k=3").table == {"k": 3}
  assert _set("table=none", config=Settings(table={"k": 1})).table is None


def test_a_key_path_through_a_non_dict_entry_is_an_error():
  with pytest.raises(ValueError, match=r"options\.a\.b is 1, not a dict"):
    _set("options.a.b.c=2")


def test_the_real_configs_take_dataset_option_overrides():
  config = gsnr_sweep.get_config(quick=True)
  new = configs.apply_overrides(config, ["dataset_options.mixture.n_real=200"])
  assert new.dataset_options["mixture"]["n_real"] == 200
  assert new.dataset_options["digits-synthetic"] == config.dataset_options["digits-synthetic"]
  assert config.dataset_options["mixture"]["n_real"] == 100

  bench = mts_benchmark.get_config()
  before = copy.deepcopy(mts_benchmark.DATASET_OPTIONS)
  new = configs.apply_overrides(bench, ["options.mixture.n_real=100"])
  assert new.options["mixture"] == {**before["mixture"], "n_real": 100}
  assert mts_benchmark.DATASET_OPTIONS == before and bench.options == before


# errors and immutability


def test_an_unknown_field_lists_the_valid_fields_sorted():
  fields = sorted(f.name for f in dataclasses.fields(Settings))
  with pytest.raises(ValueError, match="unknown setting 'cnt'.*expected one of " + ", ".join(fields)):
    _set("cnt=3")
  inner = ", ".join(sorted(f.name for f in dataclasses.fields(Inner)))
  message = f"unknown setting 'inner.rte': Inner has no field 'rte'; expected one of {inner}"
  with pytest.raises(ValueError, match=message):
    _set("inner.rte=3")


def test_a_key_path_into_a_scalar_or_tuple_field_is_an_error():
  message = r"cannot set 'sizes\.x': sizes is a tuple\[int, \.\.\.\] field, not a dataclass or dict"
  with pytest.raises(ValueError, match=message):
    _set("sizes.x=1")
  with pytest.raises(ValueError, match=r"cannot set 'count\.x\.y': count is a int field"):
    _set("count.x.y=1")
  with pytest.raises(ValueError, match=r"cannot set 'warmup\.optimizer\.x'"):
    configs.apply_overrides(gsnr_sweep.get_config(quick=True), ["warmup.optimizer.x=1"])


def test_unsupported_annotations_are_errors_naming_field_and_type():
  with pytest.raises(ValueError, match=r"weights has type list\[float\], which cannot be set"):
    _set("weights=1,2")
  with pytest.raises(ValueError, match=r"hook has type .*Callable.* None, which cannot be set"):
    _set("hook=f")
  assert _set("hook=none", config=Settings(hook=print)).hook is None


def test_unresolvable_annotations_fail_only_when_their_field_is_set():
  config = configs.apply_overrides(Unresolved(), ["count=4", "inner.rate=0.3"])
  assert config == Unresolved(count=4, inner=Inner(rate=0.3))
  with pytest.raises(ValueError, match="thing has the annotation 'NoSuchType', which does not name a type"):
    configs.apply_overrides(Unresolved(), ["thing=1"])


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="a dataclass config instance, got dict"):
    configs.apply_overrides({"count": 1}, ["count=2"])
  with pytest.raises(ValueError, match="a dataclass config instance, got type"):
    configs.apply_overrides(Settings, ["count=2"])
  with pytest.raises(ValueError, match="the single string 'count=2'"):
    configs.apply_overrides(Settings(), "count=2")


def test_a_new_config_is_returned_and_the_original_is_unchanged():
  original = Settings()
  new = _set("count=9", "inner.rate=0.9", "options.a.b=9", "sizes=9", config=original)
  assert original == Settings()
  assert new is not original and new.inner is not original.inner
  assert (new.count, new.inner.rate, new.options["a"]["b"], new.sizes) == (9, 0.9, 9, (9,))
  assert configs.apply_overrides(original, []) is original
  with pytest.raises(dataclasses.FrozenInstanceError):
    new.count = 1


def test_a_failing_override_leaves_the_config_unchanged():
  original = Settings()
  with pytest.raises(ValueError):
    _set("count=2", "sizes=x", config=original)
  assert original == Settings()


# properties


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_ints_round_trip(n):
  assert _set(f"count={n}").count == n


@given(st.floats(allow_nan=False))
def test_floats_round_trip_through_repr(x):
  assert _set(f"rate={x!r}").rate == x


@given(st.lists(st.integers(min_value=-1000, max_value=1000), max_size=6))
def test_int_tuples_round_trip_in_both_forms(values):
  assert _set("sizes=" + ",".join(map(str, values))).sizes == tuple(values)
  assert _set(f"sizes={values}").sizes == tuple(values)
