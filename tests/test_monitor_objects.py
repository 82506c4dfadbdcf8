"""The object registry and the TLS checks of a migration, in QEMU's order and words."""

from __future__ import annotations

import pytest

from vmferry.errors import QmpError
from vmferry.migration.params import MigrationParameters
from vmferry.monitor.objects import (
    AuthzSimple,
    ObjectRegistry,
    TlsCredentials,
    TlsSetup,
    create_object,
    migration_tls,
)


def params(**values: str) -> MigrationParameters:
    return MigrationParameters.from_qmp({k.replace("_", "-"): v for k, v in values.items()})


def test_registry_add_get_remove() -> None:
    reg = ObjectRegistry()
    creds = TlsCredentials("tls0", "client")
    reg.add("tls0", creds)
    assert reg.get("tls0") is creds and reg.get("nope") is None
    with pytest.raises(QmpError, match="duplicate property 'tls0'"):
        reg.add("tls0", creds)
    reg.remove("tls0")
    with pytest.raises(QmpError, match="object 'tls0' not found"):
        reg.remove("tls0")


def test_plain_text_when_tls_creds_is_empty_hostname_and_authz_ignored_as_in_qemu() -> None:
    for end in ("client", "server"):
        assert migration_tls(params(), ObjectRegistry(), endpoint=end) is None
        assert migration_tls(params(tls_hostname="h", tls_authz="a"), ObjectRegistry(), endpoint=end) is None


@pytest.mark.parametrize("endpoint", ["client", "server"])
def test_missing_creds_are_refused_by_id(endpoint: str) -> None:
    with pytest.raises(QmpError, match=r"^No TLS credentials with id 'tls0'$"):
        migration_tls(params(tls_creds="tls0"), ObjectRegistry(), endpoint=endpoint)  # type: ignore[arg-type]


def test_checks_follow_qemus_order_and_never_fall_back_to_plain_text() -> None:
    reg = ObjectRegistry()
    reg.add("notcreds", object())
    reg.add("c", TlsCredentials("c", "client"))
    reg.add("s", TlsCredentials("s", "server"))
    reg.add("authz0", object())
    cases = [
        (params(tls_creds="notcreds"), "client", "", "Object with id 'notcreds' is not TLS credentials"),
        (params(tls_creds="s"), "client", "h", "Expected TLS credentials for a client endpoint"),
        (params(tls_creds="c"), "server", "", "Expected TLS credentials for a server endpoint"),
        (params(tls_creds="c"), "client", "", "No hostname available for TLS"),
        (params(tls_creds="s", tls_authz="nobody"), "server", "", "Cannot find QAuthZ object ID nobody"),
        (params(tls_creds="s", tls_authz="authz0"), "server", "",
         "Object with id 'authz0' is not an authorization object"),
    ]
    for p, endpoint, host, message in cases:
        with pytest.raises(QmpError) as info:
            migration_tls(p, reg, endpoint=endpoint, uri_host=host)  # type: ignore[arg-type]
        assert str(info.value) == message


def test_checks_passed_give_the_hostname_and_the_authorization() -> None:
    reg = ObjectRegistry()
    reg.add("c", TlsCredentials("c", "client"))
    reg.add("s", TlsCredentials("s", "server"))
    reg.add("auth0", AuthzSimple("auth0", "CN=src.example.com,O=Example Org"))
    # tls-hostname wins over the URI's host; without it the URI's host is checked.
    assert migration_tls(params(tls_creds="c", tls_hostname="dst"), reg, endpoint="client",
                         uri_host="192.0.2.7") == TlsSetup(reg.get("c"), hostname="dst")  # type: ignore[arg-type]
    assert migration_tls(params(tls_creds="c"), reg, endpoint="client", uri_host="192.0.2.7") == TlsSetup(
        reg.get("c"), hostname="192.0.2.7")  # type: ignore[arg-type]
    plain = migration_tls(params(tls_creds="s"), reg, endpoint="server")
    assert plain is not None and plain.authorize is None
    setup = migration_tls(params(tls_creds="s", tls_authz="auth0"), reg, endpoint="server")
    assert setup is not None and setup.authorize is not None
    assert setup.authorize("CN=src.example.com,O=Example Org") is None
    assert setup.authorize("CN=evil.example.com,O=Example Org") == (
        "client 'CN=evil.example.com,O=Example Org' is not allowed by tls-authz 'auth0'")
    assert "sent no certificate" in (setup.authorize(None) or "")


def test_psk_client_needs_no_hostname(tmp_path) -> None:
    (tmp_path / "keys.psk").write_text("qemu:00112233\n")
    reg = ObjectRegistry()
    reg.add("p", create_object("tls-creds-psk", "p", {"dir": str(tmp_path), "endpoint": "client"}))
    setup = migration_tls(params(tls_creds="p"), reg, endpoint="client", uri_host="")
    assert setup is not None and setup.hostname == ""
