"""Settings: embedded defaults under one state directory, file and environment, and errors that name the field."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from auditing.config import ConfigError, json_schema
from gate.intake import IntakeLimits
from gate.settings import SETTING_TYPES, Limits, Settings, SettingsError, env_name, load_settings

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
    ("FTGATE_MAX_STEPS", "0", "limits.max_steps must be greater than or equal to 1 (got 0) [set by FTGATE_MAX_STEPS]"),
    ("FTGATE_MAX_STEPS", "5000000", "limits.max_steps must be less than or equal to 1000000 (got 5000000) [set by "
                                    "FTGATE_MAX_STEPS]"),
    ("FTGATE_MAX_UPLOAD_BYTES", "lots", "limits.max_upload_bytes must be a valid integer (got 'lots')"),
    ("FTGATE_MAX_LEARNING_RATE", "2", "limits.max_learning_rate must be less than or equal to 1 (got 2.0)"),
    ("FTGATE_CONTAMINATION_REJECT_RATIO", "-0.1", ("limits.contamination_reject_ratio must be greater than or equal "
                                                  "to 0 (got -0.1)")),
    ("FTGATE_CONTAMINATION_FLAG_RATIO", "0.5", ("limits.contamination_flag_ratio (0.5) must not exceed "
                                               "limits.contamination_reject_ratio (0.1)")),
    ("FTGATE_MAX_RESOLUTION", "4", "limits.max_resolution must be greater than or equal to 8 (got 4)"),
    ("FTGATE_MAX_RANK", "1.5", "limits.max_rank must be a valid integer (got '1.5') [set by FTGATE_MAX_RANK]"),
    ("FTGATE_LEASE_SECONDS", "1", "lease_seconds must be greater than or equal to 2 (got 1) [set by "
                                  "FTGATE_LEASE_SECONDS]"),
    ("FTGATE_AUDIT_SECONDS_PER_IMAGE", "soon", "audit_seconds_per_image must be a valid number (got 'soon')"),
    ("FTGATE_WEBHOOK_PRIVATE_TARGETS", "sometimes", "webhook_private_targets must be 'refuse' or 'allow' (got "
                                                   "'sometimes') [set by FTGATE_WEBHOOK_PRIVATE_TARGETS]"),
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
    assert info.value.field == name if name == "FTGATE_MAXSTEPS" else (
        info.value.field.rpartition(".")[2] == name.removeprefix("FTGATE_").lower())
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("text", "field", "expected"), [
    ('database_ur = "sqlite://"\n', "database_ur", "unknown setting(s) ['database_ur']"),
    ("[limits]\nmax_stepz = 3\n", "limits.max_stepz", "unknown setting(s) ['limits.max_stepz']"),
    ("limits = 3\n", "limits", "'limits' must be a table"),
    ("state_dir = 7\n", "state_dir", "state_dir must be a string"),
    ('[limits]\nmax_files = "many"\n', "limits.max_files",
     "limits.max_files must be a valid integer (got 'many') [set in "),
    ("[limits]\nmax_files = 0\n", "limits.max_files",
     "limits.max_files must be greater than or equal to 1 (got 0) [set in "),
    ("max_attempts = 1000\n", "max_attempts", "max_attempts must be less than or equal to 100 (got 1000) [set in "),
    ("database_url = 7\n", "database_url", "database_url must be a valid string (got 7) [set in "),
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
    # The policy record's own message names its field and the bound; the loader adds the file and where that file
    # was named.
    for text, message in [("max_unsafe_rate = 2.0\n", "policy.max_unsafe_rate must be less than or equal to 1 "
                                                     "(got 2.0)"),
                          ("ceiling = 0.1\n", "policy.ceiling is not a known field; allowed: ['name', 'version', ")]:
        policy.write_text(text)
        with pytest.raises(SettingsError) as info:
            load_settings({"FTGATE_VERDICT_POLICY": str(policy), "FTGATE_STATE_DIR": str(tmp_path)})
        assert info.value.field == "verdict_policy"
        assert str(info.value).startswith(f"verdict_policy {policy}: {message}")
        assert str(info.value).endswith(" [set by FTGATE_VERDICT_POLICY]")
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


def test_records_refuse_bad_values_when_built_directly_too(tmp_path):
    """Not only the loader: constructing or replacing a record with a bad value raises the same ConfigError,
    strictly typed (a bool is no count, a string no number)."""
    assert SettingsError is ConfigError
    settings = load_settings({"FTGATE_STATE_DIR": str(tmp_path)})
    for changes, field, message in [
        ({"lease_seconds": 1}, "lease_seconds", "lease_seconds must be greater than or equal to 2 (got 1)"),
        ({"max_attempts": True}, "max_attempts", "max_attempts must be a valid integer (got True)"),
        ({"state_dir": str(tmp_path)}, "state_dir", "state_dir must be an instance of Path"),
        ({"limits": {"max_steps": 0}}, "limits.max_steps", "limits.max_steps must be greater than or equal to 1"),
        ({"limits": {"max_stepz": 1}}, "limits.max_stepz", "limits.max_stepz is not a known field; allowed: ["),
    ]:
        with pytest.raises(ConfigError) as info:
            dataclasses.replace(settings, **changes)
        assert (info.value.field, str(info.value).startswith(message)) == (field, True), str(info.value)
    with pytest.raises(ConfigError) as info:
        Limits(max_learning_rate="0.01")
    assert info.value.field == "limits.max_learning_rate"
    assert str(info.value) == "limits.max_learning_rate must be a valid number (got '0.01')"
    assert dataclasses.replace(settings, limits={"max_steps": 7}).limits == Limits(max_steps=7)


def test_environment_text_becomes_each_fields_type():
    """The loader converts a variable's text by the field's own type, so a setting added to a record is read
    from the environment with no table to update."""
    assert {key: SETTING_TYPES[key] for key in ("limits.max_steps", "limits.max_lora_scale", "state_dir",
                                                "metrics_dir", "verdict_policy", "broker_url",
                                                "webhook_private_targets")} == {
        "limits.max_steps": int, "limits.max_lora_scale": float, "state_dir": Path, "metrics_dir": Path,
        "verdict_policy": Path, "broker_url": str, "webhook_private_targets": str}
    assert {f"limits.{f.name}" for f in dataclasses.fields(Limits)} <= set(SETTING_TYPES)
    settings = load_settings({"HOME": "/nonexistent", "FTGATE_MAX_LORA_SCALE": "3", "FTGATE_METRICS_DIR": "~/m",
                              "FTGATE_WEBHOOK_PRIVATE_TARGETS": "allow", "FTGATE_ARTIFACT_STORE": "s3://b/p"})
    assert settings.limits.max_lora_scale == 3.0 and settings.metrics_dir == Path("~/m").expanduser()
    assert (settings.webhook_private_targets, settings.artifact_store) == ("allow", "s3://b/p")


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("FALSE", False), ("0", False),
                                                ("yes", "yes")])
def test_boolean_text(text, expected):
    from gate.settings import _from_text

    assert _from_text(bool, text) == expected


def _number(text: str) -> float:
    base, _, power = text.partition("^")
    return float(base) ** int(power) if power else float(base)


def test_the_settings_table_lists_every_setting_with_the_bounds_the_schema_publishes():
    """docs/gate-storage.md's table names every setting and its variable; each range it states is the one the
    records check and publish in their JSON schema (no second copy of a bound to drift)."""
    table = (DOCS / "gate-storage.md").read_text()
    rows = re.findall(r"^\| `(\[limits\] )?(\w+)` \| `(FTGATE_\w+)` \| (.*) \|$", table, re.M)
    documented = {("limits." if limit else "") + name: (variable, text) for limit, name, variable, text in rows}
    assert set(documented) == set(SETTING_TYPES)
    schema = json_schema(Settings)
    properties = {**schema["properties"],
                  **{f"limits.{k}": v for k, v in schema["$defs"]["Limits"]["properties"].items()}}
    for key, (variable, text) in documented.items():
        assert variable == env_name(key)
        bounds = properties[key].get("minimum"), properties[key].get("maximum")
        stated = re.search(r"in \[([^,\]]+), ([^\]]+)\]", text)
        if bounds == (None, None):
            assert stated is None, key
        else:
            assert stated and tuple(map(_number, stated.groups())) == bounds, (key, text, bounds)
