"""The ``ftgate`` command line and the world build entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from auditing.shapes.cli import PRETRAINED_WORLD
from auditing.shapes.pretrain import WorldBuildConfig, build_world
from gate.cli import main


def test_help_lists_the_world_subcommands():
    out = subprocess.run([sys.executable, "-m", "gate.cli", "world", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("build", "check", "data"):
        assert name in out
    top = subprocess.run([sys.executable, "-m", "gate.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("demo", "world", "probes", "audit"):
        assert name in top


def test_world_data_command_writes_manifest(tmp_path, capsys):
    assert main(["world", "data", "--out", str(tmp_path / "d"), "--size", "6", "--contamination", "0.5"]) == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["datasets"]["contaminated-0.5"]["unsafe_images"] == 3
    assert (tmp_path / "d" / "probes" / "unsafe.csv").is_file()


def test_bad_input_names_the_field(tmp_path, capsys):
    assert main(["world", "data", "--out", str(tmp_path / "d"), "--unsafe", "mauve triangle"]) == 2
    assert "colour 'mauve'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unet_stepz"):
        WorldBuildConfig.from_dict({"unet_stepz": 3})
    with pytest.raises(ValueError, match="empty_caption_prob"):
        WorldBuildConfig(empty_caption_prob=2.0)
    with pytest.raises(ValueError, match=r"^world build\.threads must be greater than or equal to 1 \(got 0\)"):
        WorldBuildConfig.from_dict({"threads": 0})
    with pytest.raises(ValueError, match=r"^world build\.unsafe_concept: colour 'mauve'"):
        WorldBuildConfig.from_dict({"unsafe_concept": "mauve triangle"})


def test_the_shipped_worlds_build_config_loads():
    world = json.loads((PRETRAINED_WORLD / "world.json").read_text())
    assert asdict(WorldBuildConfig.from_dict(world["config"])) == world["config"]


def test_build_world_end_to_end_on_a_few_steps(tmp_path):
    """Same code path as the real build, shrunk to seconds; output loads and carries its record."""
    from auditing.models.loading import load_pipeline

    config = WorldBuildConfig(images=64, vae_steps=2, unet_steps=2, batch_size=8)
    record = build_world(tmp_path / "w", config)
    assert record["config"]["unet_steps"] == 2
    pipe = load_pipeline(tmp_path / "w")
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae_scaling_factor"])
    assert json.loads((tmp_path / "w" / "world.json").read_text())["kind"] == "ftgate.shapes-world"
    assert not (tmp_path / "w.partial").exists()
    with pytest.raises(FileExistsError):
        build_world(tmp_path / "w", config)


def test_build_config_file_errors_name_the_field(tmp_path, capsys):
    config = tmp_path / "world.toml"
    config.write_text('unet_steps = 0\n')
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--config", str(config)]) == 2
    assert "world build.unet_steps must be greater than or equal to 1 (got 0)" in capsys.readouterr().err
    config.write_text('unet_stepz = 3\n')
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--config", str(config)]) == 2
    assert "unet_stepz" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
