"""effc's options: the one place that parses and validates them.

`Config.from_options(options)` turns the dict that `torch.compile(..., options=...)` forwards
(plus `EFFC_*` environment variables for what the dict leaves unset) into typed, validated
dataclasses. Every pass has its own `PassConfig` subclass; the generic `parse_fields` checks
keys, types and ranges from the dataclass fields, so adding a knob is adding a field.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

LOWERINGS = ("auto", "eager", "inductor", "triton")
_PARSING_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("effc_option_key", default="")


def knob(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
         min_exclusive: bool = False) -> Any:
    """A config field with a docstring and an optional inclusive range (or exclusive minimum)."""
    meta = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict, set)):
        raise TypeError("knob defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Knobs every pass has. A pass subclasses this and adds its own fields with `knob`.

    A config object is validated when constructed (`effc.LowRankConfig(rank=-3)` raises
    ValueError naming `low_rank.rank`) and is accepted as an option value in place of a dict.
    """

    option_key: ClassVar[str] = ""  # the option this config is the value of ("low_rank")

    include: tuple[str, ...] = knob((), "glob patterns on parameter/module names the pass may act on")
    exclude: tuple[str, ...] = knob((), "glob patterns on names the pass must leave alone")

    def __post_init__(self) -> None:
        key = _PARSING_KEY.get() or self.option_key
        for name, value in check_fields(type(self), self.__dict__, f"{key}." if key else "").items():
            object.__setattr__(self, name, value)  # lists become tuples, ints floats
        self.validate(key)

    def validate(self, key: str) -> None:
        """Cross-field checks; raise ValueError naming `key`. Ranges are checked before this."""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "None"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted) for `value` against annotation `tp`; no silent truthiness or rounding."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return False, value


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
        bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
        raise ValueError(f"effc option {key!r}: expected a value {bound}"
                         + (f" and <= {hi}" if hi is not None else "") + f", got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"effc option {key!r}: expected a value <= {hi}, got {value!r}")


def _known_fields(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`cls`'s init fields by name; a ValueError names the first key of `values` not among
    them and lists the accepted ones."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            raise ValueError(f"effc option {prefix + str(key)!r} is not a known key; accepted "
                             f"keys: " + ", ".join(f"{prefix}{k}" for k in fields))
    return fields


def check_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Type- and range-check `values` against dataclass `cls`'s fields; the converted values.

    Raises ValueError naming the bad key (`prefix` + field name) and what it accepts.
    """
    fields = _known_fields(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        ok, converted = _coerce(value, hints[key])
        if not ok:
            raise ValueError(f"effc option {full!r}: expected {_describe(hints[key])}, "
                             f"got {value!r} ({type(value).__name__})")
        _check_range(full, converted, fields[key].metadata)
        out[key] = converted
    return out


def parse_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `values`, raising ValueError that names the bad key."""
    if not isinstance(values, Mapping):
        raise ValueError(f"effc option {prefix.rstrip('.') or 'options'!r}: expected a dict, "
                         f"got {type(values).__name__}")
    if issubclass(cls, PassConfig):  # its __post_init__ validates, under the key being parsed
        _known_fields(cls, values, prefix)
        token = _PARSING_KEY.set(prefix.rstrip("."))
        try:
            return cls(**values)
        finally:
            _PARSING_KEY.reset(token)
    obj = cls(**check_fields(cls, values, prefix))
    if hasattr(obj, "validate"):
        obj.validate(prefix.rstrip("."))
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> doc, for README tables and error messages."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls) if f.init}


@dataclasses.dataclass(frozen=True)
class GlobalOptions:
    """The top-level options that are not pass names."""

    include: tuple[str, ...] = knob((), "glob patterns on names every pass may act on")
    exclude: tuple[str, ...] = knob((), "glob patterns on names no pass may touch")
    disable: tuple[str, ...] = knob((), "pass names to switch off (bisecting which pass hurt)")
    max_rewrites: int | None = knob(None, "rewrite at most this many sites in all (bisecting)",
                                    min=0)
    lowering: Literal["auto", "eager", "inductor", "triton"] = knob(
        "auto", "auto: eager (Triton on CUDA once validated on a GPU); triton: generated "
                "kernels (on CPU under TRITON_INTERPRET=1)")
    kernels: tuple[Literal["gemm", "row", "pointwise"], ...] = knob(
        ("gemm", "row", "pointwise"), "lowering='triton': the kinds of generated kernel to use; "
        "the ops of a kind left out run eagerly (['row', 'pointwise']: every GEMM a library call)")
    debug_dir: str | None = knob(None, "write the debug dump under this folder")
    strict: bool = knob(False, "raise instead of skipping a site or rolling back a pass")
    verify: bool = knob(False, "run original and rewritten graph on the example inputs and "
                               "report the output error")
    instruments: tuple[object, ...] = knob((), "effc.compiler.pass_manager.Instrument objects")
    calibration: object | None = knob(None, "activation statistics from effc.calibrate(...)")
    cache_dir: str | None = knob(None, "where generated kernels are cached (default "
                                       "~/.cache/effc/kernels)")


_ENV = {  # environment variable -> (key, parser)
    "EFFC_DEBUG_DIR": ("debug_dir", str),
    "EFFC_LOWERING": ("lowering", str),
    "EFFC_STRICT": ("strict", "bool"),
    "EFFC_VERIFY": ("verify", "bool"),
    "EFFC_DISABLE": ("disable", "list"),
    "EFFC_MAX_REWRITES": ("max_rewrites", int),
    "EFFC_CACHE_DIR": ("cache_dir", str),
    "EFFC_KERNELS": ("kernels", "list"),
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _env_value(var: str, raw: str, kind: Any) -> Any:
    if kind == "bool":
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(f"effc environment variable {var}: expected one of "
                         f"{', '.join(_TRUE + _FALSE[:-1])}, got {raw!r}")
    if kind == "list":
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"effc environment variable {var}: expected an int, got {raw!r}") from None
    return raw


def _pass_classes() -> dict[str, type]:
    from effc.passes import registered  # late: passes import this module

    return registered()


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated options: the enabled passes (in the fixed pass order) and the global knobs."""

    passes: dict[str, PassConfig] = dataclasses.field(default_factory=dict)
    options: GlobalOptions = dataclasses.field(default_factory=GlobalOptions)

    def __getattr__(self, name: str) -> Any:
        # Global knobs read as attributes: config.strict, config.lowering, ...
        if name != "options" and name in GlobalOptions.__dataclass_fields__:
            return getattr(self.options, name)
        raise AttributeError(name)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> Config:
        """Parse `options` (torch.compile's dict); `env` (default os.environ) fills the rest.

        This is what the backend calls on every compile; call it yourself to check options
        before compiling: a bad key or value raises ValueError naming it and what it accepts.
        """
        env = os.environ if env is None else env
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"effc options: expected a dict of option names to values, e.g. "
                             f"options={{'low_rank': True}}, got {type(options).__name__} "
                             f"{options!r}"[:300])
        options = dict(options or {})
        if not all(isinstance(k, str) for k in options):
            raise ValueError("effc options: keys must be strings, got "
                             + ", ".join(repr(k) for k in options if not isinstance(k, str)))
        known = _pass_classes()
        accepted = list(known) + list(field_docs(GlobalOptions))
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise ValueError(f"effc option {unknown[0]!r} is not a known key; accepted keys: "
                             + ", ".join(accepted)
                             + ("" if known else " (no rewrite pass is implemented yet)"))
        raw_passes = {k: options.pop(k) for k in list(options) if k in known}
        for var, (key, kind) in _ENV.items():
            if key not in options and var in env:
                options[key] = _env_value(var, env[var], kind)
        if "EFFC_PASSES" in env:
            for name in _env_value("EFFC_PASSES", env["EFFC_PASSES"], "list"):
                if name not in known:
                    raise ValueError(f"effc environment variable EFFC_PASSES: unknown pass "
                                     f"{name!r}; accepted: {', '.join(known) or '(none yet)'}")
                raw_passes.setdefault(name, True)
        glob = parse_fields(GlobalOptions, options)
        for name in glob.disable:
            if name not in known:
                raise ValueError(f"effc option 'disable': unknown pass {name!r}; accepted: "
                                 + (", ".join(known) or "(no pass is implemented yet)"))
        from effc.compiler.pass_manager import Instrument

        for inst in glob.instruments:
            if not isinstance(inst, Instrument):
                raise ValueError("effc option 'instruments': expected Instrument objects, got "
                                 f"{type(inst).__name__}")
        from effc.compiler.calibration import Calibration

        if glob.calibration is not None and not isinstance(glob.calibration, Calibration):
            raise ValueError("effc option 'calibration': expected the object effc.calibrate(...) "
                             f"returns (effc.compiler.calibration.Calibration), got "
                             f"{type(glob.calibration).__name__}")
        passes = {}
        for name, klass in known.items():  # registry order is the pass order
            if name not in raw_passes:
                continue
            value = raw_passes[name]
            if value is False:
                continue
            if value is True:
                value = {}
            if isinstance(value, klass.config_cls):
                passes[name] = value  # validated when it was constructed
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"effc option {name!r}: expected True, False, a dict of "
                                 f"{name}'s knobs ({', '.join(field_docs(klass.config_cls))}) "
                                 f"or a {klass.config_cls.__name__}, got {value!r}")
            passes[name] = parse_fields(klass.config_cls, value, prefix=f"{name}.")
        return cls(passes=passes, options=glob)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for the report (instruments shown by class name)."""
        glob = {f: getattr(self.options, f) for f in field_docs(GlobalOptions)}
        glob["instruments"] = [type(i).__name__ for i in self.options.instruments]
        glob["calibration"] = None if self.calibration is None else f"{len(self.calibration.inputs)} sites"
        return {"passes": {n: dataclasses.asdict(c) for n, c in self.passes.items()}, **glob}
