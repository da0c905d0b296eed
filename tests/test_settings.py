"""Settings: embedded defaults under one state directory, file and environment, and errors that name the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gate.intake import IntakeLimits
from gate.settings import Limits, SettingsError, load_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    return tmp_path


def test_empty_environment_puts_everything_under_one_state_dir(home):
    settings = load_settings({})
    state = home / ".local" / "state" / "ftgate"
    assert settings.state_dir == state
    assert settings.database_url == f"sqlite:///{state}/ftgate.db"
    assert settings.broker_url is None
    assert settings.embedded_broker_dir == state / "redis"
    assert settings.artifacts_dir == state / "artifacts"
    assert settings.limits == Limits()
    assert settings.verdict_policy.name == "default" and settings.verdict_policy_file is None
    assert not state.exists()  # loading settings creates nothing


def test_xdg_state_home_and_state_dir_variable(tmp_path):
    assert load_settings({"XDG_STATE_HOME": str(tmp_path)}).state_dir == tmp_path / "ftgate"
    settings = load_settings({"FTGATE_STATE_DIR": str(tmp_path / "s")})
    assert settings.database_url == f"sqlite:///{tmp_path}/s/ftgate.db"
    assert settings.artifacts_dir == tmp_path / "s" / "artifacts"


def test_environment_overrides_file_and_file_overrides_defaults(tmp_path):
    config = tmp_path / "conf" / "ftgate.toml"
    config.parent.mkdir()
    config.write_text('state_dir = "state"\nbroker_url = "redis://127.0.0.1:6379/0"\n'
                      "[limits]\nmax_steps = 100\nmax_rank = 8\n")
    settings = load_settings({"FTGATE_CONFIG": str(config), "FTGATE_MAX_STEPS": "200",
                              "FTGATE_BROKER_URL": "redis://queue:6379/1"})
    assert settings.limits.max_steps == 200  # env
    assert settings.limits.max_rank == 8  # file
    assert settings.limits.max_batch_size == Limits().max_batch_size  # default
    assert settings.broker_url == "redis://queue:6379/1"
    assert settings.state_dir == config.parent / "state"  # relative to the file
    assert settings.config_file == config
    assert load_settings({}, path=config).broker_url == "redis://127.0.0.1:6379/0"


def test_verdict_policy_file_is_loaded_and_validated(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"name": "strict", "version": 3, "max_unsafe_rate": 0.02}))
    settings = load_settings({"FTGATE_STATE_DIR": str(tmp_path), "FTGATE_VERDICT_POLICY": str(policy)})
    assert (settings.verdict_policy.name, settings.verdict_policy.version) == ("strict", 3)
    assert settings.verdict_policy.max_unsafe_rate == 0.02
    assert settings.verdict_policy_file == policy


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("FTGATE_MAX_STEPS", "0", "limits.max_steps must be an integer in [1, 1000000] (got 0) [set by FTGATE_MAX_STEPS]"),
    ("FTGATE_MAX_UPLOAD_BYTES", "lots", "limits.max_upload_bytes must be an integer"),
    ("FTGATE_MAX_LEARNING_RATE", "2", "limits.max_learning_rate must be a number in [1e-12, 1.0] (got 2.0)"),
    ("FTGATE_CONTAMINATION_REJECT_RATIO", "-0.1", "limits.contamination_reject_ratio must be a number in [0.0, 1.0]"),
    ("FTGATE_CONTAMINATION_FLAG_RATIO", "0.5", ("limits.contamination_flag_ratio (0.5) must not exceed "
                                               "limits.contamination_reject_ratio (0.1)")),
    ("FTGATE_MAX_RESOLUTION", "4", "limits.max_resolution must be an integer in [8, 8192] (got 4)"),
    ("FTGATE_MAX_RANK", "1.5", "limits.max_rank must be an integer in [1, 4096] (got '1.5')"),
    ("FTGATE_DATABASE_URL", "mysql://u:hunter2@db/x", "database_url must be a URL for one of ['sqlite', 'postgresql']"),
    ("FTGATE_BROKER_URL", "amqp://guest@mq//", ("broker_url must use one of the schemes ['redis', 'rediss', "
                                               "'redis+socket']")),
    ("FTGATE_VERDICT_POLICY", "policy.yaml", "policy.yaml must be one of ['.json', '.toml']"),
    ("FTGATE_MAXSTEPS", "10", "unknown environment setting(s) ['FTGATE_MAXSTEPS']"),
])
def test_each_bad_value_names_its_field_and_the_allowed_values(tmp_path, name, value, expected):
    with pytest.raises(SettingsError) as info:
        load_settings({"FTGATE_STATE_DIR": str(tmp_path), name: value})
    assert expected in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("text", "field", "expected"), [
    ('database_ur = "sqlite://"\n', "database_ur", "unknown setting(s) ['database_ur']"),
    ("[limits]\nmax_stepz = 3\n", "limits.max_stepz", "unknown setting(s) ['limits.max_stepz']"),
    ("limits = 3\n", "limits", "'limits' must be a table"),
    ("state_dir = 7\n", "state_dir", "state_dir must be a string"),
    ('[limits]\nmax_files = "many"\n', "limits.max_files", ("limits.max_files must be an integer in [1, 1000000] "
                                                           "(got 'many') [set in ")),
    ("state_dir = [\n", "config", "is not valid TOML"),
])
def test_bad_config_file_names_the_field(tmp_path, text, field, expected):
    config = tmp_path / "ftgate.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings({"FTGATE_STATE_DIR": str(tmp_path)}, path=config)
    assert info.value.field == field
    assert expected in str(info.value)


def test_bad_policy_file_and_missing_config_file(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("max_unsafe_rate = 2.0\n")
    with pytest.raises(SettingsError, match=r"verdict_policy .*policy.toml: max_unsafe_rate must be in \[0, 1\]"):
        load_settings({"FTGATE_VERDICT_POLICY": str(policy), "FTGATE_STATE_DIR": str(tmp_path)})
    policy.write_text("ceiling = 0.1\n")
    with pytest.raises(SettingsError, match=r"unknown policy field\(s\) \['ceiling'\]"):
        load_settings({"FTGATE_VERDICT_POLICY": str(policy), "FTGATE_STATE_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"FTGATE_CONFIG": str(tmp_path / "nope.toml")})


def test_state_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SettingsError, match="state_dir .* is not a directory"):
        load_settings({"FTGATE_STATE_DIR": str(tmp_path / "f")})


def test_summary_hides_passwords(tmp_path):
    settings = load_settings({"FTGATE_STATE_DIR": str(tmp_path),
                              "FTGATE_DATABASE_URL": "postgresql+psycopg://gate:s3cret@db/gate",
                              "FTGATE_BROKER_URL": "redis://:s3cret@queue:6379/0"})
    summary = settings.summary()
    assert "s3cret" not in summary
    assert "postgresql+psycopg://gate:***@db/gate" in summary and "redis://:***@queue:6379/0" in summary


@pytest.mark.parametrize("name", ["contamination_flag_ratio", "contamination_reject_ratio"])
def test_contamination_defaults_agree_in_settings_intake_and_docs(name):
    """One default per ratio: the service's settings, the intake's own limits, and every place the docs state
    it (the intake's policy and limits table, the settings table) say the same number."""
    stated = re.findall(rf"`{name}` \(default ([0-9.]+)", (DOCS / "intake.md").read_text())
    stated += re.findall(rf"^\| `{name}` \| ([0-9.]+)", (DOCS / "intake.md").read_text(), re.M)
    stated += re.findall(rf"^\| `\[limits\] {name}` \| `[A-Z_]+` \| ([0-9.]+)", (DOCS / "gate-storage.md").read_text(),
                         re.M)
    assert len(stated) == 3, stated
    assert {float(v) for v in stated} == {getattr(Limits(), name)} == {getattr(IntakeLimits(), name)}


def test_any_unsafe_image_flags_a_dataset_by_default():
    """The default flag ratio is 0: a single image the scanner calls unsafe puts the dataset before a reviewer."""
    assert Limits().contamination_flag_ratio == IntakeLimits().contamination_flag_ratio == 0.0
