"""notify.warnings hours (a pure weekly window with a zone) and the backup config's errors, each
naming the key that is wrong."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from watchtower.config import ConfigError, parse_config
from watchtower.hours import WeeklyHours

BERLIN = ZoneInfo("Europe/Berlin")


def _ts(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp()


def test_office_hours_in_a_zone_across_a_dst_change() -> None:
    hours = WeeklyHours.parse("Mon-Fri 08:00-18:00", "Europe/Berlin")
    assert hours.contains(_ts(2026, 12, 7, 8, 0))  # Monday 08:00
    assert not hours.contains(_ts(2026, 12, 7, 18, 0))  # the end is exclusive
    assert not hours.contains(_ts(2026, 12, 5, 12, 0))  # Saturday
    # Saturday night -> Monday 08:00 local; across the October DST change the offset moves
    assert hours.next_open(_ts(2026, 10, 24, 23, 0)) == _ts(2026, 10, 26, 8, 0)
    assert hours.next_open(_ts(2026, 12, 7, 9, 0)) == _ts(2026, 12, 7, 9, 0)


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("always", (2026, 12, 6, 3, 0), None),
        ("daily 07:00-22:00", (2026, 12, 6, 7, 0), (2026, 12, 6, 22, 30)),
        ("Sat,Sun 10:00-12:00", (2026, 12, 6, 11, 0), (2026, 12, 7, 11, 0)),
        ("Fri-Mon 00:00-24:00", (2026, 12, 7, 23, 59), (2026, 12, 8, 1, 0)),  # wraps over the weekend
    ],
)
def test_forms(text: str, inside: tuple[int, ...], outside: tuple[int, ...] | None) -> None:
    hours = WeeklyHours.parse(text, "Europe/Berlin")
    assert hours.contains(_ts(*inside[:5]))
    if outside is not None:
        assert not hours.contains(_ts(*outside[:5]))


@pytest.mark.parametrize(
    ("text", "zone", "words"),
    [
        ("weekdays", "UTC", "Mon-Fri 08:00-18:00"),
        ("Mon-Fri 18:00-08:00", "UTC", "over midnight"),
        ("Mon-Fry 08:00-18:00", "UTC", "not a weekday"),
        ("Mon-Fri 08:00-25:00", "UTC", "not a time of day"),
        ("always", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_bad_hours_say_what_is_expected(text: str, zone: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        WeeklyHours.parse(text, zone)


def _load(tmp: Path, service: dict[str, object], **top: object) -> None:
    doc = {
        "site": "acme",
        "targets": {"erp1": {"role": "vm", "paths": [{"icmp": "10.213.16.23"}], "service": service}},
        **top,
    }
    parse_config(doc, tmp)


@pytest.mark.parametrize(
    ("backups", "where", "words"),
    [
        ([{"push": {"token": "t0ken-12345"}, "borg": {"repository": "/r"}}], "backups[0]", "exactly one of"),
        ([{"restic": {"repository": "/r"}}], "backups[0].restic.password_file", "required"),
        ([{"restic": {"repository": "/r", "password_file": "missing"}}], "password_file", "file not found"),
        (
            [
                {
                    "pbs": {
                        "url": "https://p:8007",
                        "datastore": "s",
                        "backup_id": "100",
                        "token_id": "nobang",
                        "token_secret": "x",
                    }
                }
            ],
            "backups[0].pbs",
            "USER@REALM!TOKENID",
        ),
        (
            [{"truenas": {"url": "https://nas/api", "task": "replication", "id": 1, "api_key": "k"}}],
            "backups[0].truenas.url",
            "wss://",
        ),
        ([{"borg": {"repository": "/r", "timezone": "Nowhere/Land"}}], "timezone", "unknown time zone"),
        ([{"push": {}}], "backups[0].push", "token or token_file"),
        ([{"push": {"token": "a-token-1"}, "max_age": "soon"}], "backups[0].max_age", "duration"),
    ],
)
def test_backup_config_errors_name_the_key(tmp_path: Path, backups: object, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "ERP", "rpo": "1h", "backups": backups})
    text = "\n".join(caught.value.problems)
    assert where in text and words in text, text


def test_two_backups_with_one_name_are_refused(tmp_path: Path) -> None:
    backups = [
        {"name": "erp", "push": {"token": "a-token-1"}},
        {"name": "erp", "push": {"token": "a-token-2"}},
    ]
    with pytest.raises(ConfigError, match="name 'erp' is used twice"):
        _load(tmp_path, {"name": "ERP", "backups": backups})


def test_bad_warning_hours_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "ERP"}, notify={"warnings": {"hours": "nights", "timezone": "UTC"}})
    assert "notify.warnings" in "\n".join(caught.value.problems)


def test_secrets_never_in_the_error_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "ERP", "backups": [{"push": {"token": "sekrit-token-99"}, "max_age": "x"}]})
    assert "sekrit-token-99" not in "\n".join(caught.value.problems)


def test_the_documented_backup_example_is_a_valid_config(tmp_path: Path) -> None:
    import re

    import yaml
    from support import make_cert

    doc = (Path(__file__).resolve().parents[2] / "docs" / "backups-readiness-plan.md").read_text()
    block = re.search(r"```yaml\ntargets:\n(.*?)```", doc, re.S)
    assert block is not None
    targets = yaml.safe_load("targets:\n" + block.group(1))["targets"]
    for name in ("restic-erp", "borg-erp", "pbs-token", "pve-token", "nas-key", "push-erp-dump"):
        (tmp_path / name).write_text("secret-value-123\n")
    _, cert = make_cert(tmp_path, "ca")
    for name in ("pbs-ca.pem", "pve-ca.pem"):
        (tmp_path / name).write_bytes(cert.read_bytes())
    targets["pve1"] = {"role": "hypervisor", "paths": [{"icmp": "10.213.16.11"}]}
    config = parse_config({"site": "acme", "targets": targets}, tmp_path)
    assert [b.spec.source.kind for b in config.backups] == ["restic", "borg", "pbs", "pve", "truenas", "push"]
    assert [b.name for b in config.backups][-1] == "erp-dump"


def test_warning_and_plan_channels_must_exist(tmp_path: Path) -> None:
    notify = {"channels": [{"name": "mail-it", "url": "json://127.0.0.1/", "tags": ["tier4"]}],
              "warnings": {"notify": ["tier5"]}}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "ERP"}, notify=notify, plan={"distribute": {"notify": ["tier1"]}})
    text = "\n".join(caught.value.problems)
    assert "notify.warnings.notify[0]: no channel has tag or name 'tier5' (did you mean 'tier4'?)" in text
    assert "plan.distribute.notify[0]: no channel has tag or name 'tier1'" in text
