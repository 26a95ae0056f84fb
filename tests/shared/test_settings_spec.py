"""One home for each setting (issue 8): the table in shared/settings_spec.py is what the loaders, the dataclasses,
`kling-relay config --help` and the README's configuration table all say.

A default changed in the code only (or in the README only) fails `test_readme_configuration_table_matches_the_spec`.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest

from kling_relay.shared.cli import main
from kling_relay.shared.settings import ClientSettings, Settings, load_client_settings, load_settings
from kling_relay.shared.settings_spec import CLIENT_SETTINGS, SETTINGS, Setting, settings_table, whole_number
from tests.shared.test_settings import GOOD

README = Path(__file__).resolve().parents[2] / "README.md"
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")
# a default cell's value, then an optional remark: "`62914560` (60 MiB)", "required, ≥ 16 chars", "— (AWS)"
_DEFAULT = re.compile(r"^(`[^`]*`|[^\s,(]+)(?:\s*\(.*\)|,.*)?$")


def _configuration_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]


def _readme_defaults() -> dict[str, str]:
    """Variable → default, as the README's configuration table writes it (backticks and remarks removed).

    A row may name several variables: `A`, `B` share one default; `A` / `B` pair with defaults `x` / `y`."""
    found: dict[str, str] = {}
    for line in _configuration_section().splitlines():
        if not line.startswith("| `"):
            continue
        variable_cell, default_cell = (cell.strip() for cell in line.split("|")[1:3])
        names = _NAME.findall(variable_cell)
        defaults = [part.strip() for part in default_cell.split(" / ")]
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"README row {line[:60]!r}: one default per variable, or one for all"
        for name, default in zip(names, defaults, strict=True):
            assert name not in found, f"README lists {name} twice"
            match = _DEFAULT.match(default)
            found[name] = (match.group(1) if match else default).strip("`")
    return found


def _mismatches(table: tuple[Setting, ...]) -> dict[str, tuple[str | None, str | None]]:
    """Variable → (README's default, the table's default) wherever they differ or one side lacks the variable."""
    readme = _readme_defaults()
    spec = {s.env: s.shown_default for s in table}
    return {name: (readme.get(name), spec.get(name)) for name in readme.keys() | spec.keys()
            if readme.get(name) != spec.get(name)}


def test_readme_configuration_table_matches_the_spec() -> None:
    """Every setting is in the README's table with the same default; the README lists no unknown variable."""
    assert _mismatches(SETTINGS) == {}


def test_a_default_changed_in_code_only_is_caught() -> None:
    changed = tuple(replace(s, default=90.0) if s.env == "RECONCILE_QUIET_SECONDS" else s for s in SETTINGS)
    assert _mismatches(changed) == {"RECONCILE_QUIET_SECONDS": ("120", "90")}
    unknown = (*SETTINGS, Setting("NEW_KNOB", 1, whole_number, "not in the README"))
    assert _mismatches(unknown) == {"NEW_KNOB": (None, "1")}
    assert _mismatches(SETTINGS[1:]) == {SETTINGS[0].env: (SETTINGS[0].shown_default, None)}


def test_readme_names_the_secrets_that_may_be_files() -> None:
    section = " ".join(_configuration_section().split())
    sentence = section.split("Secrets may be given as files instead:", 1)[1].split(". ", 1)[0]
    named = set(_NAME.findall(sentence))
    assert named == {s.env for s in SETTINGS if s.secret}


def test_dataclass_fields_are_the_spec_fields() -> None:
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert {f.name for f in fields(Settings)} - {"extra"} == {s.field for s in SETTINGS}
    assert {f.name for f in fields(ClientSettings)} == {s.field for s in CLIENT_SETTINGS}
    assert not any(s.required for s in CLIENT_SETTINGS), "the in-process client needs REDIS_URL at most"


def _types(hint: object) -> tuple[object, ...]:
    """The classes a field's type hint admits: `str | None` → (str, NoneType), `tuple[Secret, ...]` → (tuple,)."""
    if isinstance(hint, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _types(arg))
    return (typing.get_origin(hint) or hint,)


def test_each_default_has_its_fields_type_and_reads_back_as_itself() -> None:
    """A float field's default is a float (120.0, not 120), and the README's rendering of it parses to it."""
    hints = typing.get_type_hints(Settings)
    for s in SETTINGS:
        if s.required or s.default is None:
            continue
        assert type(s.default) in _types(hints[s.field]), s.env  # no bool for int, no int for float
        if s.default != "":
            assert s.parse(s.shown_default, s.env) == s.default, s.env


def test_unset_variables_take_the_table_defaults() -> None:
    loaded = load_settings(GOOD)
    for s in SETTINGS:
        if s.env not in GOOD:
            assert getattr(loaded, s.field) == s.default, s.env
    client = load_client_settings({})
    assert {s.field: getattr(client, s.field) for s in CLIENT_SETTINGS} == {s.field: s.default for s in CLIENT_SETTINGS}


def test_config_help_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_table().splitlines()[0].split() == ["variable", "default", "meaning"]
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for s in SETTINGS:
        line = next(row for row in out.splitlines() if row.split()[:1] in ([s.env], [f"{s.env}[_FILE]"]))
        assert line.split()[1] == s.shown_default.split()[0] and s.help in line
