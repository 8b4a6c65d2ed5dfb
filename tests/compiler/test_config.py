"""Options: every bad input is a ValueError naming the key; good input parses exactly."""

import dataclasses

import pytest
from helpers import CopyWeightPass

from effc.compiler.config import Config, PassConfig, knob, parse_fields
from effc.compiler.pass_manager import PrintGraphs
from effc.passes import extra_passes, registered


@dataclasses.dataclass(frozen=True)
class KnobsConfig(PassConfig):
    rank: int | None = knob(None, "fixed rank", min=1)
    ratio: float = knob(0.5, "fraction", min=0.0, max=1.0, min_exclusive=True)
    method: str = knob("svd", "method")
    flag: bool = knob(False, "a flag")

    def validate(self, key):
        if self.method not in ("svd", "qr"):
            raise ValueError(f"effc option '{key}.method': expected 'svd' or 'qr', got {self.method!r}")


class KnobsPass(CopyWeightPass):
    name = "toy_knobs"
    config_cls = KnobsConfig


@pytest.fixture
def toy():
    with extra_passes(CopyWeightPass, KnobsPass):
        yield


BAD = [
    # (options, env, substring the message must contain)
    ({"low_rnak": True}, {}, "'low_rnak'"),
    ({"lowering": "tpu"}, {}, "'lowering'"),
    ({"lowering": "cuda"}, {}, "'auto', 'eager', 'inductor', 'triton'"),
    ({"cache_dir": 3}, {}, "'cache_dir'"),
    ({"strict": "yes"}, {}, "'strict'"),
    ({"strict": 1}, {}, "'strict'"),
    ({"verify": None}, {}, "'verify'"),
    ({"debug_dir": 3}, {}, "'debug_dir'"),
    ({"include": [1, 2]}, {}, "'include'"),
    ({"exclude": 5}, {}, "'exclude'"),
    ({"max_rewrites": -1}, {}, "'max_rewrites'"),
    ({"max_rewrites": 1.5}, {}, "'max_rewrites'"),
    ({"disable": ["nope"]}, {}, "'disable'"),
    ({"instruments": [object()]}, {}, "'instruments'"),
    ({"toy_knobs": "on"}, {}, "'toy_knobs'"),
    ({"toy_knobs": 1}, {}, "'toy_knobs'"),
    ({"toy_knobs": {"rnak": 4}}, {}, "'toy_knobs.rnak'"),
    ({"toy_knobs": {"rank": 0}}, {}, "'toy_knobs.rank'"),
    ({"toy_knobs": {"rank": 4.0}}, {}, "'toy_knobs.rank'"),
    ({"toy_knobs": {"rank": True}}, {}, "'toy_knobs.rank'"),
    ({"toy_knobs": {"ratio": 0.0}}, {}, "'toy_knobs.ratio'"),
    ({"toy_knobs": {"ratio": 1.5}}, {}, "'toy_knobs.ratio'"),
    ({"toy_knobs": {"ratio": "half"}}, {}, "'toy_knobs.ratio'"),
    ({"toy_knobs": {"method": "lu"}}, {}, "'toy_knobs.method'"),
    ({"toy_knobs": {"include": [3]}}, {}, "'toy_knobs.include'"),
    ({1: True}, {}, "keys must be strings"),
    ({"calibration": {"fc1.weight": 1}}, {}, "'calibration'"),
    ({}, {"EFFC_PASSES": "toy_copy,nonsense"}, "EFFC_PASSES"),
    ({}, {"EFFC_STRICT": "maybe"}, "EFFC_STRICT"),
    ({}, {"EFFC_LOWERING": "tpu"}, "'lowering'"),
    ({}, {"EFFC_MAX_REWRITES": "many"}, "EFFC_MAX_REWRITES"),
    ({}, {"EFFC_DISABLE": "ghost"}, "'disable'"),
    ({"kernels": ["gemm", "rows"]}, {}, "'kernels'"),
    ({}, {"EFFC_KERNELS": "gemm,tiles"}, "'kernels'"),
]


@pytest.mark.parametrize("options,env,needle", BAD)
def test_bad_options_raise_value_error_naming_the_key(toy, options, env, needle):
    with pytest.raises(ValueError) as info:
        Config.from_options(options, env=env)
    assert needle in str(info.value)


def test_unknown_key_lists_the_accepted_ones(toy):
    with pytest.raises(ValueError, match="accepted keys: kv_proj, token_skip, low_rank, "
                                         "hypercomplex, shift_add, toy_copy, toy_knobs, include"):
        Config.from_options({"kv_prj": True}, env={})


def test_every_pass_of_the_design_is_registered_in_the_design_order():
    assert list(registered()) == ["kv_proj", "token_skip", "low_rank", "hypercomplex",
                                  "shift_add"]


def test_no_options_means_no_pass_and_eager_defaults():
    cfg = Config.from_options(None, env={})
    assert cfg.passes == {} and cfg.lowering == "auto" and not cfg.strict and not cfg.verify
    assert cfg.debug_dir is None and cfg.max_rewrites is None


def test_pass_values_true_false_and_dict(toy):
    cfg = Config.from_options({"toy_copy": True, "toy_knobs": {"rank": 8, "ratio": 1,
                                                               "include": "fc*"}}, env={})
    assert list(cfg.passes) == ["toy_copy", "toy_knobs"]
    knobs = cfg.passes["toy_knobs"]
    assert knobs.rank == 8 and knobs.ratio == 1.0 and isinstance(knobs.ratio, float)
    assert knobs.include == ("fc*",)
    assert Config.from_options({"toy_copy": False}, env={}).passes == {}


def test_pass_order_is_registry_order_not_dict_order(toy):
    cfg = Config.from_options({"toy_knobs": True, "toy_copy": True}, env={})
    assert list(cfg.passes) == ["toy_copy", "toy_knobs"]


def test_environment_fills_only_what_options_leave_unset(toy, tmp_path):
    env = {"EFFC_PASSES": "toy_copy", "EFFC_DEBUG_DIR": str(tmp_path), "EFFC_STRICT": "1",
           "EFFC_VERIFY": "true", "EFFC_DISABLE": "toy_copy", "EFFC_MAX_REWRITES": "3",
           "EFFC_LOWERING": "inductor", "EFFC_CACHE_DIR": str(tmp_path / "kernels"),
           "EFFC_KERNELS": "row, pointwise"}
    cfg = Config.from_options({"strict": False, "toy_copy": {"exclude": ["head*"]}}, env=env)
    assert cfg.strict is False  # option wins over EFFC_STRICT
    assert cfg.passes["toy_copy"].exclude == ("head*",)  # option dict wins over EFFC_PASSES
    assert cfg.debug_dir == str(tmp_path) and cfg.verify is True and cfg.max_rewrites == 3
    assert cfg.disable == ("toy_copy",) and cfg.lowering == "inductor"
    assert cfg.cache_dir == str(tmp_path / "kernels") and cfg.kernels == ("row", "pointwise")


def test_to_dict_is_plain_data(toy):
    cfg = Config.from_options({"toy_knobs": {"rank": 4}, "instruments": [PrintGraphs()]}, env={})
    d = cfg.to_dict()
    assert d["passes"]["toy_knobs"]["rank"] == 4 and d["instruments"] == ["PrintGraphs"]


def test_parse_fields_rejects_non_dict():
    with pytest.raises(ValueError, match="expected a dict"):
        parse_fields(KnobsConfig, ["rank", 3], prefix="toy_knobs.")


def test_pass_configs_are_exported_validated_when_built_and_accepted_as_values():
    import effc

    with pytest.raises(ValueError, match="'low_rank.rank': expected a value >= 1, got -3"):
        effc.LowRankConfig(rank=-3)
    with pytest.raises(ValueError, match="'low_rank.svd'"):
        effc.LowRankConfig(svd="qr")
    with pytest.raises(ValueError, match="give one rank rule"):
        effc.LowRankConfig(rank=8, energy=0.9)
    cfg = effc.LowRankConfig(param_budget=0.7, include=["model.*"])
    assert cfg.include == ("model.*",)  # a list becomes the tuple the field declares
    assert Config.from_options({"low_rank": cfg}, env={}).passes["low_rank"] is cfg


def test_a_config_object_of_another_pass_is_rejected_naming_the_key(toy):
    import effc

    with pytest.raises(ValueError, match="'toy_knobs': expected True, False, a dict"):
        Config.from_options({"toy_knobs": effc.LowRankConfig()}, env={})


@pytest.mark.parametrize("options", [["low_rank"], "low_rank", ("low_rank", True)])
def test_options_that_are_not_a_dict_say_what_is_expected(options):
    with pytest.raises(ValueError, match="effc options: expected a dict of option names"):
        Config.from_options(options, env={})
