"""Settings in one place: each stage's dataclass holds its defaults and its validation; a ``tledge.toml`` may set
any of them, per command; a flag given on the command line wins over the file, the file over the default.

    # tledge.toml
    [build]
    calib_method = "auto"
    max_top1_drop_pp = 0.5

    [gate]
    max_latency_regression_pct = 8.0
    min_agreement = 0.995

Keys are the dataclass field names (``tledge <command> --help`` names the flags; the README lists the fields).
An unknown section or key is an error that lists the known ones, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tledge.errors import TledgeError


def sections() -> dict[str, type]:
    """The config dataclass of each command that reads a section."""
    from tledge.bench.benchmark import BenchConfig
    from tledge.bench.gate import GateConfig
    from tledge.export.onnx_export import ExportConfig
    from tledge.pipeline.build import BuildConfig
    from tledge.quant.quantize import QuantizeConfig
    from tledge.train.finetune import FinetuneConfig

    return {"build": BuildConfig, "finetune": FinetuneConfig, "export": ExportConfig, "quantize": QuantizeConfig,
            "bench": BenchConfig, "gate": GateConfig}


def read_section(path: Path | None, section: str) -> dict:
    """The settings of ``section`` in the TOML file at ``path`` ({} without a file), checked against the fields."""
    if path is None:
        return {}
    try:
        import tomllib
    except ImportError:  # Python < 3.11 (a JetPack device): the same parser as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise TledgeError(f"reading {path} needs Python 3.11+ or the tomli package (pip install tomli)") from None

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise TledgeError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TledgeError(f"config file {path} is not valid TOML: {exc}") from None
    known = sections()
    unknown_sections = sorted(set(data) - set(known))
    if unknown_sections:
        raise TledgeError(f"{path}: unknown section(s) {unknown_sections}; tledge reads [{'], ['.join(known)}]")
    values = data.get(section, {})
    if not isinstance(values, dict):
        raise TledgeError(f"{path}: [{section}] must be a table of settings")
    fields = {f.name for f in dataclasses.fields(known[section])}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TledgeError(f"{path}: [{section}] has unknown setting(s) {unknown}; known: {', '.join(sorted(fields))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def merge(config_file: Path | None, section: str, given: dict[str, object], from_command_line: set[str]) -> dict:
    """Settings for a command: the file's section, with what was typed on the command line on top.

    ``given`` maps field names to the values the command received (its defaults where nothing was typed);
    ``from_command_line`` names the fields the user typed.
    """
    out = dict(given)
    for name, value in read_section(config_file, section).items():
        if name not in from_command_line:
            out[name] = value
    return out
