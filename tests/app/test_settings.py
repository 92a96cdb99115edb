"""Settings: one FUSIONSERVE_* variable and one flag per setting, in groups, validated when built."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.__main__ import build_parser
from app.settings import GROUPS, Settings


def test_every_setting_is_in_exactly_one_group() -> None:
    grouped = [name for group in GROUPS.values() for name in group.model_fields]
    assert sorted(grouped) == sorted(Settings.model_fields)
    assert len(grouped) == len(set(grouped))


def test_every_setting_has_a_one_line_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and "\n" not in field.description and len(field.description) <= 100, name


def test_variables_keep_their_flat_names_and_win_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSIONSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FUSIONSERVE_DECODE_SPLIT_KB", "0")
    monkeypatch.setenv("FUSIONSERVE_API_KEY", "s3cret")
    s = Settings()
    assert (s.max_batch_size, s.decode_split_kb) == (7, 0.0)
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert s.is_set("max_batch_size") and not s.is_set("max_queue")
    assert s.checkpoint is None  # the bundled model, resolved when the models load


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("checkpoint", "/no/such/file.safetensors", "does not exist"),
        ("max_batch_size", 0, "greater than or equal to 1"),
        ("port", 70000, "less than or equal to 65535"),
        ("loop", "tokio", "Input should be"),
    ],
)
def test_bad_settings_are_refused_when_built(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_the_shutdown_grace_covers_decoding_and_the_queue() -> None:
    s = Settings(decode_timeout_s=10, request_timeout_s=2.5)
    assert s.longest_request_s == 18  # ceil(10 + 2.5) + 5 for the batch in hand
    assert Settings(max_upload_mb=1.5).max_upload_bytes == 1_572_864


def test_the_command_line_has_one_flag_per_setting_under_its_group(tmp_path: Path) -> None:
    parser = build_parser()
    titles = {group.title: [a.dest for a in group._group_actions] for group in parser._action_groups}
    for title, group in GROUPS.items():
        assert titles[title] == list(group.model_fields)
    args = parser.parse_args(["--max-batch-size", "3", "--no-wide-lane", "--checkpoint", str(tmp_path)])
    assert (args.max_batch_size, args.wide_lane, args.checkpoint) == ("3", False, str(tmp_path))
    assert Settings(**{k: v for k, v in vars(args).items() if v is not None}).max_batch_size == 3
