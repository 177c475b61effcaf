"""Load an experiment: a Python module (file path or dotted name) with `config() -> Config`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback

from lm.config import Config, ConfigError, apply_overrides, from_dict, set_keys


def load(spec: str, overrides: list[str] | None = None) -> Config:
    """`experiments/pretrain_tiny.py`, `experiments.pretrain_tiny`, `pretrain_tiny`, or a
    run's `config.json` (e.g. one written by `lm import-hf`)."""
    if spec.endswith(".json"):
        return _load_json(spec, overrides or [])
    module = _import(spec)
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {spec!r} defines no config() function returning a Config")
    try:
        cfg = module.config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- an error inside config()
        raise ConfigError(f"experiment {spec}: config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"experiment {spec!r}: config() returned {type(cfg).__name__}, not Config")
    return apply_overrides(cfg, overrides or [])


def _load_json(spec: str, overrides: list[str]) -> Config:
    """A config.json (`to_dict` output): every key and value type checked, then the overrides,
    then `Config.validate`; each failure is one line naming the file."""

    if not os.path.exists(spec):
        raise ConfigError(f"config file {spec!r} does not exist")

    def no_constant(name: str):  # NaN, Infinity: Python's json reads them, no config means them
        raise ConfigError(f"{spec}: {name} is not a valid value in a config; write a finite number")

    try:
        with open(spec, encoding="utf-8") as f:
            raw = json.load(f, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{spec} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          "fix or regenerate it (a run's config.json, e.g. from `lm import-hf`)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{spec} is not UTF-8 text; a config file is JSON (a run's config.json)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {spec!r}: {e.strerror or e}") from None
    cfg = set_keys(from_dict(raw, where=spec), overrides)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{spec}{' with --set' if overrides else ''}: {e}") from None


def _import(spec: str):
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = os.path.abspath(spec if spec.endswith(".py") else spec + ".py")
        if not os.path.exists(path):
            raise ConfigError(f"experiment file {spec!r} does not exist")
        name = "experiments_" + os.path.splitext(os.path.basename(path))[0]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ConfigError(f"experiment {spec}: syntax error at line {e.lineno}: {e.msg}") from None
        except Exception as e:  # noqa: BLE001 -- a failing import or top-level statement
            raise ConfigError(f"experiment {spec} failed to load: {_where(e, path)}{type(e).__name__}: {e}") from None
        return module
    for name in (spec, "experiments." + spec):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in (name, name.rsplit(".", 1)[0]) and not name.startswith(e.name or "\0"):
                raise  # the experiment exists but imports something missing
    available = list_experiments()
    raise ConfigError(f"no experiment {spec!r}; available: {', '.join(available) or '(none)'}")


def _where(e: BaseException, path: str) -> str:
    """'line N: ' of the innermost frame of `e` in the experiment file."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    return f"line {lines[-1]}: " if lines else ""


def list_experiments() -> list[str]:
    """The training experiments of experiments/ (not the curation configs, curate_*.py, which
    `lm data curate` runs)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    if not os.path.isdir(here):
        return []
    return sorted(f[:-3] for f in os.listdir(here)
                  if f.endswith(".py") and not f.startswith("_") and not f.startswith("curate_"))
