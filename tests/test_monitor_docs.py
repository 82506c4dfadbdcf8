"""docs/qmp.md is generated from the command table; it must match it."""

from __future__ import annotations

from pathlib import Path

from vmferry.migration.params import PARAMETER_SPECS
from vmferry.monitor import docs
from vmferry.monitor.commands import COMMANDS
from vmferry.monitor.events import EVENTS

DOC = Path(__file__).resolve().parents[1] / "docs" / "qmp.md"


def test_docs_match_the_command_table() -> None:
    assert DOC.read_text() == docs.render(), "docs/qmp.md is stale: run python -m vmferry.monitor.docs"


def test_docs_mention_every_command_parameter_and_event() -> None:
    text = docs.render()
    for name in COMMANDS:
        assert f"### `{name}`" in text
    for spec in PARAMETER_SPECS:
        assert f"| `{spec.qmp_name}` |" in text
    for name in EVENTS:
        assert f"### `{name}`" in text


def test_check_mode(tmp_path) -> None:
    out = tmp_path / "qmp.md"
    assert docs.main(["--check", str(out)]) == 1
    assert docs.main([str(out)]) == 0
    assert docs.main(["--check", str(out)]) == 0


def test_required_commands_are_in_the_table() -> None:
    required = {
        "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "quit",
        "system_powerdown", "query-cpus-fast", "migrate", "migrate-incoming", "migrate_cancel",
        "query-migrate", "migrate-set-parameters", "query-migrate-parameters", "migrate-set-capabilities",
        "query-migrate-capabilities", "migrate-start-postcopy",
    }
    assert required <= set(COMMANDS)
    assert {a.name for a in COMMANDS["migrate-set-parameters"].args} == {s.qmp_name for s in PARAMETER_SPECS}
