"""Settings in one place: dataclass defaults, a tledge.toml per command, flags typed on the command line on top."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tledge.bench.gate import GateConfig
from tledge.cli import app
from tledge.defaults import default
from tledge.errors import TledgeError
from tledge.pipeline.build import BuildConfig
from tledge.pipeline.config import read_section
from tledge.quant.quantize import QuantizeConfig


def test_the_cli_states_the_libraries_defaults():
    import typer.main

    command = typer.main.get_command(app)
    params = {name: {p.name: p.default for p in cmd.params} for name, cmd in command.commands.items()}
    assert params["quantize"]["fallback_layers"] == default(QuantizeConfig, "fallback_layers")
    assert params["quantize"]["num_calib"] == default(QuantizeConfig, "num_images")
    assert params["build"]["max_top1_drop"] == default(BuildConfig, "max_top1_drop_pp") == default(QuantizeConfig, "max_top1_drop_pp")
    assert params["gate"]["max_latency_regression"] == default(GateConfig, "max_latency_regression_pct")
    assert default(BuildConfig, "bench_iterations") == 200 and default(BuildConfig, "epochs") == 40


def test_build_settings_are_checked_by_the_stage_that_uses_them():
    with pytest.raises(TledgeError, match="calibration method"):
        BuildConfig(calib_method="bogus")
    with pytest.raises(TledgeError, match="epochs"):
        BuildConfig(epochs=0)
    with pytest.raises(TledgeError, match="QAT"):
        BuildConfig(qat_epochs=-1)
    with pytest.raises(TledgeError, match="iterations"):
        BuildConfig(bench_iterations=0)


def test_a_config_file_is_checked_key_by_key(tmp_path):
    good = tmp_path / "tledge.toml"
    good.write_text('[gate]\nmax_latency_regression_pct = 8.0\nmin_agreement = 0.995\n[quantize]\ntargets = ["cpu"]\n')
    assert read_section(good, "gate") == {"max_latency_regression_pct": 8.0, "min_agreement": 0.995}
    assert read_section(good, "quantize") == {"targets": ("cpu",)}
    assert read_section(good, "bench") == {}
    typo = tmp_path / "typo.toml"
    typo.write_text("[gate]\nmax_latency_regresion_pct = 8.0\n")
    with pytest.raises(TledgeError, match="unknown setting.*max_latency_regresion_pct.*known: .*max_latency_regression_pct"):
        read_section(typo, "gate")
    (tmp_path / "section.toml").write_text("[deploy]\nx = 1\n")
    with pytest.raises(TledgeError, match="unknown section"):
        read_section(tmp_path / "section.toml", "gate")
    (tmp_path / "broken.toml").write_text("[gate\n")
    with pytest.raises(TledgeError, match="not valid TOML"):
        read_section(tmp_path / "broken.toml", "gate")
    with pytest.raises(TledgeError, match="does not exist"):
        read_section(tmp_path / "none.toml", "gate")


def test_flags_typed_win_over_the_file_and_the_file_over_defaults(tiny_pipeline, tmp_path):
    model = tiny_pipeline / "model.fp32.onnx"
    config = tmp_path / "tledge.toml"
    config.write_text("[gate]\nblocks = 9\ncalls_per_block = 1\nmax_latency_regression_pct = 1000.0\n")  # latency is not what this checks
    runner = CliRunner()
    result = runner.invoke(app, ["gate", str(model), str(model), "--config", str(config), "--out-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "a" / "gate.json").read_text())["config"]
    assert (used["blocks"], used["calls_per_block"], used["max_latency_regression_pct"]) == (9, 1, 1000.0)
    result = runner.invoke(app, ["gate", str(model), str(model), "--config", str(config), "--blocks", "10", "--out-dir", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "b" / "gate.json").read_text())["config"]
    assert (used["blocks"], used["calls_per_block"]) == (10, 1)  # typed beats the file; the rest of the file still applies
