"""The registry: loading the example, rejecting bad files with file:line and field, lookups.

Each rejected case starts from ``BASE`` (a small valid registry), changes one
thing with :func:`edit`, and checks that the error names the field, the file
and the line of the offending text (found with :func:`line_of`, so the tests
do not hard-code line numbers).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from slim.core.registry import Registry, load_registry, load_registry_text, normalize_dir
from slim.errors import ConfigError, InvalidArgument, NotFound
from slim.vocabulary import Policy

EXAMPLE = Path(__file__).parent.parent / "docs" / "registry.example.yaml"
FILE = "reg.yaml"

BASE = """\
settings:
  stale_after: 20
sites:
  s1:
    prefixes: [10.1.0.0/16]
  s2:
    prefixes: [10.2.0.0/16]
relays:
  r1:
    urls: [http://10.1.0.1:8080/]
    site: s1
  r2:
    urls: [http://10.2.0.1:8080/]
    site: s2
    parent: r1
profiles:
  p1:
    modules: [e1000]
  p2:
    firmware: uefi
environments:
  e1:
    image: /img/e1
    directories:
      /usr: nfs
  e2:
    image: /img/e2
    default_policy: sync
nodes:
  n1:
    macs: ["52:54:00:00:00:01"]
    profile: p1
    environment: e1
    site: s1
  n2:
    macs: ["52:54:00:00:00:02"]
    profile: p2
    environment: e2
    site: s2
    disk: /dev/sda3
"""


# -- helpers ------------------------------------------------------------------


def edit(text: str, anchor: str, old: str, new: str) -> str:
    """``text`` with the first ``old`` after the (unique) ``anchor`` replaced by ``new``."""
    assert text.count(anchor) == 1, f"anchor {anchor!r} is not unique"
    start = text.index(anchor)
    at = text.index(old, start)
    return text[:at] + new + text[at + len(old) :]


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the only line of ``text`` that contains ``needle``."""
    found = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(found) == 1, f"{needle!r} is on lines {found}, want exactly one"
    return found[0]


def line_after(text: str, anchor: str, needle: str) -> int:
    """The 1-based number of the first line holding ``needle`` after the (unique) line holding ``anchor``."""
    start = line_of(text, anchor)
    lines = text.splitlines()
    return next(i for i in range(start + 1, len(lines) + 1) if needle in lines[i - 1])


def rejected(text: str, file: str = FILE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_registry_text(text, file=file)
    return info.value


def assert_problem(err: ConfigError, field: str, line: int, fragment: str, file: str = FILE) -> None:
    """``err`` lists ``file:line: field: ...fragment...`` (in its message and its problems)."""
    where = f"{file}:{line}: {field}: "
    listed = [str(p) for p in err.problems if str(p).startswith(where)]
    assert listed, f"no problem starting {where!r} in:\n{err}"
    assert any(fragment in p for p in listed), f"{fragment!r} not in {listed}"
    assert where in str(err)


def only_problem(text: str, field: str, needle: str, fragment: str) -> ConfigError:
    """``text`` is rejected with exactly one problem, at ``field`` on the line holding ``needle``."""
    err = rejected(text)
    assert len(err.problems) == 1, str(err)
    assert_problem(err, field, line_of(text, needle), fragment)
    return err


def base() -> Registry:
    return load_registry_text(BASE, file=FILE)


# -- the example file and the base --------------------------------------------


def test_example_registry_loads() -> None:
    reg = load_registry(EXAMPLE)
    assert reg.source == str(EXAMPLE)
    assert set(reg.nodes) == {"n001", "n002", "n003", "lab-pc-07", "vm1"}
    assert reg.node("lab-pc-07").macs == ["52:54:00:00:03:07"]
    assert reg.node_name_by_mac("52:54:00:00:03:07") == "lab-pc-07"
    assert reg.node_name_by_mac("52:54:00:00:02:02") == "n002"
    dirs = reg.directories("jdk14")
    assert dirs["/"].policy is Policy.SYNC
    assert dirs["/usr"].policy is Policy.NFS
    assert dirs["/tmp"].policy is Policy.RAM
    assert dirs["/tmp"].size == "1g"
    assert list(dirs) == sorted(dirs)
    assert reg.feature_of("jdk14") == "ee:jdk14"
    assert reg.feature_of("base") == "ee:base"
    assert reg.site_of_address(ipaddress.ip_address("10.2.3.4")) == "remote-lab"
    assert reg.site_of_address(ipaddress.ip_address("198.51.100.77")) == "home-isp"
    assert reg.site_of_address(ipaddress.ip_address("fd00:1::42")) == "machine-room"
    assert reg.site_of_address(ipaddress.ip_address("192.0.2.1")) is None
    assert reg.relays["central"].capacity == 4
    assert reg.relays["mr-1"].urls == ["http://10.1.0.2:8080/"]
    assert reg.settings.stale_after == 20
    assert reg.nfs_server_for("remote-lab") == "10.2.0.1"
    assert reg.nfs_server_for("home-isp") == "10.1.0.1"  # falls back to settings
    assert reg.directories("base")["/home"].nfs_options == "rw,nolock,noatime,proto=tcp"
    assert reg.directories("base")["/usr"].nfs_options.startswith("ro,")


def test_base_registry_is_valid() -> None:
    reg = base()
    assert set(reg.nodes) == {"n1", "n2"}
    assert reg.source == FILE


def test_empty_document_is_an_empty_registry() -> None:
    reg = load_registry_text("# nothing yet\n", file=FILE)
    assert dict(reg.nodes) == {}
    assert reg.settings.stale_after == 20.0


# -- rejected registries: one test per case -----------------------------------


def test_node_with_unknown_environment() -> None:
    text = edit(BASE, "  n1:", "environment: e1", "environment: nope")
    err = only_problem(text, "nodes.n1.environment", "environment: nope", "unknown environment 'nope'")
    assert "(known environments: e1, e2)" in str(err)


def test_node_with_unknown_profile() -> None:
    text = edit(BASE, "  n1:", "profile: p1", "profile: p9")
    err = only_problem(text, "nodes.n1.profile", "profile: p9", "unknown hardware profile 'p9'")
    assert "(known profiles: p1, p2)" in str(err)


def test_node_with_unknown_site() -> None:
    text = edit(BASE, "  n1:", "site: s1", "site: nowhere")
    only_problem(text, "nodes.n1.site", "site: nowhere", "unknown site 'nowhere' (known sites: s1, s2)")


def test_mac_used_by_two_nodes() -> None:
    # another spelling of n1's MAC: the check compares normalized MACs
    text = edit(BASE, "  n2:", '"52:54:00:00:00:02"', '"52-54-00-00-00-01"')
    only_problem(
        text,
        "nodes.n2.macs[0]",
        "52-54-00-00-00-01",
        "MAC 52:54:00:00:00:01 is used twice (also by node 'n1')",
    )


def test_mac_used_twice_by_one_node() -> None:
    text = edit(BASE, "  n1:", '["52:54:00:00:00:01"]', '["52:54:00:00:00:01", "525400000001"]')
    only_problem(text, "nodes.n1.macs[1]", "525400000001", "is used twice (also by this node)")


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        ("10.1.0.0/33", "not a valid IPv4 or IPv6 network"),
        ("10.1.0.1/8", "has host bits set"),
        ("fd00::1/64", "has host bits set"),
        ("10.1.0.0/16/8", "not a valid IPv4 or IPv6 network"),
    ],
)
def test_invalid_cidr(prefix: str, reason: str) -> None:
    text = edit(BASE, "  s1:", "10.1.0.0/16", prefix)
    err = only_problem(text, "sites.s1.prefixes[0]", prefix, reason)
    assert repr(prefix) in str(err)  # the message names the bad prefix


def test_unknown_directory_policy() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr: nfz")
    only_problem(
        text,
        "environments.e1.directories[/usr].policy",
        "/usr: nfz",
        "unknown policy 'nfz' (choose one of: ram, disk, sync, nfs)",
    )


def test_unknown_default_policy() -> None:
    text = edit(BASE, "  e2:", "default_policy: sync", "default_policy: copy")
    only_problem(text, "environments.e2.default_policy", "default_policy: copy", "unknown policy 'copy'")


def test_directory_not_absolute() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "usr/local: nfs")
    only_problem(
        text,
        "environments.e1.directories[usr/local]",
        "usr/local: nfs",
        "directory 'usr/local' is not an absolute path",
    )


def test_directory_with_dotdot() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr/../etc: nfs")
    only_problem(text, "environments.e1.directories[/usr/../etc]", "/usr/../etc", "contains '..'")


@pytest.mark.parametrize(
    ("first", "second"),
    [("/var", "/var/"), ("/var", "/var/./"), ("/var", "//var"), ("/var/lib", "/var//lib")],
)
def test_two_policies_for_one_directory(first: str, second: str) -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", f"/usr: nfs\n      {first}: ram\n      {second}: nfs")
    norm = normalize_dir(first)
    only_problem(
        text,
        f"environments.e1.directories[{second}]",
        f"{second}: nfs",
        f"two policies for the same directory {norm} (also given as {first!r})",
    )


def test_root_listed_as_directory() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/: nfs")
    only_problem(text, "environments.e1.directories[/]", "/: nfs", "set with default_policy")


def test_relay_parent_loop() -> None:
    text = edit(BASE, "  r1:", "site: s1", "site: s1\n    parent: r2")
    err = rejected(text)
    assert len(err.problems) == 2, str(err)  # one at each member of the loop
    assert_problem(err, "relays.r1.parent", line_of(text, "parent: r2"), "parent chain loops: r1 -> r2 -> r1")
    assert_problem(err, "relays.r2.parent", line_of(text, "parent: r1"), "parent chain loops: r2 -> r1 -> r2")


def test_relay_is_its_own_parent() -> None:
    text = edit(BASE, "  r1:", "site: s1", "site: s1\n    parent: r1")
    err = rejected(text)
    assert len(err.problems) == 1, str(err)
    assert_problem(
        err, "relays.r1.parent", line_after(text, "  r1:", "parent: r1"), "parent chain loops: r1 -> r1"
    )


def test_relay_leading_into_a_loop_is_not_reported() -> None:
    # r3 -> r1 -> r2 -> r1: the loop is reported at r1 and r2 only, once each
    text = edit(BASE, "  r1:", "site: s1", "site: s1\n    parent: r2")
    text = edit(
        text, "  r2:", "parent: r1", "parent: r1\n  r3:\n    urls: [http://r3/]\n    site: s1\n    parent: r1"
    )
    err = rejected(text)
    assert sorted(p.field for p in err.problems) == ["relays.r1.parent", "relays.r2.parent"]


def test_relay_with_unknown_parent() -> None:
    text = edit(BASE, "  r2:", "parent: r1", "parent: r9")
    only_problem(text, "relays.r2.parent", "parent: r9", "unknown relay 'r9' (known relays: r1, r2)")


def test_relay_with_unknown_site() -> None:
    text = edit(BASE, "  r2:", "site: s2", "site: s7")
    only_problem(text, "relays.r2.site", "site: s7", "unknown site 's7'")


def test_relay_with_invalid_url() -> None:
    text = edit(BASE, "  r1:", "http://10.1.0.1:8080/", "ftp://10.1.0.1/")
    only_problem(text, "relays.r1.urls[0]", "ftp://10.1.0.1/", "is not an http:// URL with a host")


def test_relay_url_with_an_international_host_name_asks_for_its_ascii_form() -> None:
    """The initrd's Python has no IDNA codec: the name must come as xn--."""
    text = edit(BASE, "  r1:", "http://10.1.0.1:8080/", "http://bücher.example:8080/")
    only_problem(text, "relays.r1.urls[0]", "bücher.example", "write an international host name as xn--")


def test_relay_wakes_from_an_address_not_an_interface_name() -> None:
    text = edit(BASE, "  r1:", "site: s1", "site: s1\n    wake_to: 10.1.255.255:9\n    wake_from: eth0")
    only_problem(text, "relays.r1.wake_from", "wake_from: eth0", "'eth0' is not an IP address")


def test_relay_urls_may_be_https_and_a_child_checks_its_parent_by_name() -> None:
    """A relay with https_listen is named by an https:// URL; its children fetch from it over
    HTTPS, expecting its certificate's name (r1.relay.slim), whatever host the URL names."""
    text = edit(BASE, "  r1:", "[http://10.1.0.1:8080/]", "[https://10.1.0.1:8443, http://10.1.0.1:8080/]")
    reg = load_registry_text(text, FILE)
    assert reg.relays["r1"].urls == ["https://10.1.0.1:8443/", "http://10.1.0.1:8080/"]
    assert reg.relay_upstreams("r2") == ["https://10.1.0.1:8443/#r1.relay.slim", "http://10.1.0.1:8080/"]


def test_relay_url_with_query() -> None:
    text = edit(BASE, "  r1:", "http://10.1.0.1:8080/", "'http://10.1.0.1:8080/?x=1'")
    only_problem(text, "relays.r1.urls[0]", "?x=1", "takes no query or fragment")


def test_duplicate_yaml_key() -> None:
    text = edit(BASE, "  n1:", "profile: p1", "profile: p1\n    profile: p3")
    err = only_problem(text, "nodes.n1.profile", "profile: p3", "duplicate key 'profile'")
    assert f"(first given on line {line_of(text, 'profile: p1')})" in str(err)


def test_duplicate_node_name() -> None:
    text = BASE + "  n1:\n    macs: ['52:54:00:00:00:09']\n    profile: p1\n    environment: e1\n"
    err = rejected(text)
    assert len(err.problems) == 1, str(err)
    assert_problem(err, "nodes.n1", len(text.splitlines()) - 3, "duplicate key 'n1'")


def test_yaml_aliases_are_refused_before_they_expand() -> None:
    # a self-referencing alias would recurse forever; an alias bomb would exhaust memory
    err = rejected("nodes: &a [*a]\n")
    assert_problem(err, "nodes[0]", 1, "YAML anchors and aliases are not supported")
    bomb = "a: &a [x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    err = rejected(bomb)
    assert all("anchors and aliases" in str(p) for p in err.problems)


def test_nfs_server_must_be_an_address_or_host_name() -> None:
    text = BASE.replace("settings:\n", "settings:\n  nfs_server: nfs server\n", 1)
    only_problem(text, "settings.nfs_server", "nfs_server:", "neither an IP address nor a host name")
    for good in ("10.1.0.1", "fd00::1", "nfs-1.example.org"):
        load_registry_text(BASE.replace("settings:\n", f"settings:\n  nfs_server: {good}\n", 1))


def test_unknown_field() -> None:
    text = edit(BASE, "  n1:", "site: s1", "site: s1\n    grups: [rack1]")
    only_problem(text, "nodes.n1.grups", "grups:", "unknown field (check the spelling")


def test_unknown_section() -> None:
    text = BASE + "relay:\n  r3: {}\n"
    only_problem(text, "relay", "relay:", "unknown field")


def test_missing_required_field() -> None:
    text = edit(BASE, "  e2:", "    image: /img/e2\n", "")
    only_problem(text, "environments.e2.image", "  e2:", "required field is missing")


def test_yaml_syntax_error() -> None:
    text = edit(BASE, "  n1:", "profile: p1", "profile: p1: p2")
    only_problem(text, "(syntax)", "profile: p1: p2", "mapping values are not allowed here")


def test_document_not_a_mapping() -> None:
    err = rejected("- nodes\n- sites\n")
    assert len(err.problems) == 1
    assert_problem(err, "(document)", 1, "the registry must be a mapping of sections")


def test_invalid_mac() -> None:
    text = edit(BASE, "  n1:", '"52:54:00:00:00:01"', '"52:54:00:00:00:zz"')
    only_problem(text, "nodes.n1.macs[0]", "00:zz", "is not a MAC address")


def test_unquoted_numeric_mac_says_to_quote_it() -> None:
    # YAML 1.1 reads 52:54:00:00:01:01 (digits only) as a base-60 number
    text = edit(BASE, "  n1:", '"52:54:00:00:00:01"', "52:54:00:00:01:01")
    only_problem(text, "nodes.n1.macs[0]", "52:54:00:00:01:01", "a MAC address must be quoted")


def test_invalid_name() -> None:
    text = edit(BASE, "  n2:", "  n2:", "  'n 2':")
    only_problem(text, "nodes[n 2]", "'n 2':", "'n 2' is not a valid name")


def test_node_without_disk_for_sync_environment() -> None:
    text = edit(BASE, "  n2:", "    disk: /dev/sda3\n", "")
    only_problem(
        text, "nodes.n2.disk", "  n2:", "environment 'e2' copies / to disk, but the node has no 'disk'"
    )


def test_node_without_disk_for_disk_directory() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr: nfs\n      /var: disk")
    only_problem(text, "nodes.n1.disk", "  n1:", "environment 'e1' copies /var to disk")


def test_two_environments_with_one_feature() -> None:
    text = edit(BASE, "  e2:", "default_policy: sync", "default_policy: sync\n    feature: ee:e1")
    only_problem(
        text,
        "environments.e2.feature",
        "feature: ee:e1",
        "feature 'ee:e1' is also the feature of environment 'e1'",
    )


def test_environment_name_that_is_no_slurm_feature() -> None:
    env = "  jdk-14:\n    image: /img/jdk\n"
    text = edit(BASE, "  e2:", "  e2:", env + "  e2:")
    only_problem(
        text,
        "environments.jdk-14",
        "  jdk-14:",
        "'ee:jdk-14' cannot be a Slurm feature (want prefix:value of [A-Za-z0-9_.]); "
        "set 'feature:' explicitly, e.g. ee:jdk_14",
    )
    # ... and with the feature given, it is fine and resolvable by it
    fixed = edit(BASE, "  e2:", "  e2:", env + "    feature: ee:jdk_14\n  e2:")
    reg = load_registry_text(fixed, file=FILE)
    assert reg.resolve_environment("ee=jdk_14") == "jdk-14"


def test_explicit_feature_that_is_no_slurm_feature() -> None:
    text = edit(BASE, "  e2:", "default_policy: sync", "default_policy: sync\n    feature: jdk14")
    only_problem(text, "environments.e2.feature", "feature: jdk14", "'jdk14' cannot be a Slurm feature")


def test_one_prefix_for_two_sites() -> None:
    text = edit(BASE, "  s2:", "10.2.0.0/16", "10.2.0.0/16, 10.1.0.0/16")
    only_problem(
        text, "sites.s2.prefixes[1]", "10.2.0.0/16, 10.1.0.0/16", "10.1.0.0/16 is also a prefix of site 's1'"
    )


def test_options_for_a_non_nfs_policy() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr: nfs\n      /tmp: {policy: ram, options: ro}")
    only_problem(
        text,
        "environments.e1.directories[/tmp].options",
        "/tmp:",
        "mount options apply only to the nfs policy",
    )


def test_size_for_a_non_ram_policy() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr: {policy: nfs, size: 1g}")
    only_problem(
        text, "environments.e1.directories[/usr].size", "/usr:", "a size applies only to the ram policy"
    )


def test_bad_tmpfs_size() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr: nfs\n      /tmp: {policy: ram, size: lots}")
    only_problem(text, "environments.e1.directories[/tmp].size", "/tmp:", "'lots' is not a tmpfs size")


def test_settings_out_of_range() -> None:
    text = edit(BASE, "settings:", "stale_after: 20", "stale_after: 0")
    only_problem(text, "settings.stale_after", "stale_after: 0", "greater than 0")


def test_many_problems_are_reported_at_once() -> None:
    text = edit(BASE, "  n1:", "environment: e1", "environment: nope")
    text = edit(text, "  n2:", "profile: p2", "profile: p9")
    text = edit(text, "  r1:", "site: s1", "site: s1\n    parent: r1")
    text = edit(text, "  r2:", "site: s2", "site: s7")
    err = rejected(text)
    assert len(err.problems) == 4, str(err)
    assert str(err).startswith("4 problems in configuration:\n")
    assert_problem(err, "nodes.n1.environment", line_of(text, "environment: nope"), "unknown environment")
    assert_problem(err, "nodes.n2.profile", line_of(text, "profile: p9"), "unknown hardware profile")
    assert_problem(err, "relays.r2.site", line_of(text, "site: s7"), "unknown site 's7'")
    assert any(p.field == "relays.r1.parent" for p in err.problems)


def test_many_schema_problems_are_reported_at_once() -> None:
    text = edit(BASE, "  n1:", '"52:54:00:00:00:01"', '"bad"')
    text = edit(text, "  s1:", "10.1.0.0/16", "10.1.0.0/33")
    text = edit(text, "  e1:", "/usr: nfs", "/usr: nfz")
    err = rejected(text)
    assert len(err.problems) == 3, str(err)
    assert_problem(err, "nodes.n1.macs[0]", line_of(text, '"bad"'), "not a MAC address")
    assert_problem(err, "sites.s1.prefixes[0]", line_of(text, "/33"), "not a valid")
    assert_problem(err, "environments.e1.directories[/usr].policy", line_of(text, "nfz"), "unknown policy")


def test_problems_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    text = edit(BASE, "  n1:", "environment: e1", "environment: nope")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert_problem(
        info.value,
        "nodes.n1.environment",
        line_of(text, "environment: nope"),
        "unknown environment",
        file=str(path),
    )
    assert info.value.problems[0].file == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert f"{path}: (file): no such file" in str(info.value)


def test_config_error_is_an_invalid_argument() -> None:
    err = rejected(edit(BASE, "  n1:", "environment: e1", "environment: nope"))
    assert isinstance(err, InvalidArgument)
    assert err.grpc_code == "INVALID_ARGUMENT"
    assert err.http_status == 400


# -- lookups ------------------------------------------------------------------


def test_node_lookup() -> None:
    reg = base()
    assert reg.node("n2").disk == "/dev/sda3"
    with pytest.raises(NotFound, match="unknown node 'n9'"):
        reg.node("n9")


@pytest.mark.parametrize(
    "spelling",
    [
        "52:54:00:00:00:01",
        "52-54-00-00-00-01",
        "525400000001",
        "52:54:00:00:00:01".upper(),
        " 52:54:00:00:00:01 ",
    ],
)
def test_node_name_by_mac_accepts_common_spellings(spelling: str) -> None:
    assert base().node_name_by_mac(spelling) == "n1"


def test_node_name_by_unknown_mac() -> None:
    with pytest.raises(NotFound, match="no node has MAC 52:54:00:00:00:99"):
        base().node_name_by_mac("52-54-00-00-00-99")


@pytest.mark.parametrize(
    "bad", ["", "zz:54:00:00:00:01", "52:54:00:00:00", "52:54-00:00:00:01", "5254.0000.0001"]
)
def test_node_name_by_bad_mac(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a MAC address") as info:
        base().node_name_by_mac(bad)
    assert not isinstance(info.value, NotFound)


def test_resolve_environment() -> None:
    reg = load_registry(EXAMPLE)
    assert reg.resolve_environment("jdk14") == "jdk14"
    assert reg.resolve_environment("ee:jdk14") == "jdk14"
    assert reg.resolve_environment("ee=jdk14") == "jdk14"
    assert reg.resolve_environment("ee:desktop") == "desktop"


def test_resolve_unknown_environment_lists_known_ones() -> None:
    reg = load_registry(EXAMPLE)
    with pytest.raises(NotFound) as info:
        reg.resolve_environment("ee:jdk15")
    assert str(info.value) == "unknown environment 'ee:jdk15' (known: base, desktop, jdk14)"
    with pytest.raises(NotFound, match=r"known: base, desktop, jdk14"):
        reg.environment("nope")


def test_directories_are_normalized() -> None:
    text = edit(BASE, "  e1:", "/usr: nfs", "/usr/: nfs\n      //opt/x/: ram")
    reg = load_registry_text(text, file=FILE)
    assert list(reg.directories("e1")) == ["/", "/opt/x", "/usr"]
    assert reg.directories("e1")["/"].policy is Policy.RAM


@pytest.mark.parametrize(
    ("raw", "norm"), [("/usr/", "/usr"), ("//usr", "/usr"), ("///usr//lib/.", "/usr/lib"), ("//", "/")]
)
def test_normalize_dir(raw: str, norm: str) -> None:
    assert normalize_dir(raw) == norm


def test_parent_chain() -> None:
    text = BASE.replace("relays:\n", "relays:\n  r0:\n    urls: [http://r0/]\n    site: s1\n", 1)
    text = edit(text, "  r1:", "site: s1", "site: s1\n    parent: r0")
    reg = load_registry_text(text, file=FILE)
    assert reg.parent_chain("r2") == ["r1", "r0"]
    assert reg.parent_chain("r1") == ["r0"]
    assert reg.parent_chain("r0") == []
    example = load_registry(EXAMPLE)
    assert example.parent_chain("mr-1") == ["central"]
    assert example.parent_chain("central") == []


NESTED = """\
sites:
  campus:
    prefixes: [10.0.0.0/8, "2001:db8::/32"]
  lab:
    prefixes: [10.1.0.0/16, 10.1.2.0/24, "2001:db8:1::/48"]
  room:
    prefixes: [10.1.2.128/25]
"""


@pytest.mark.parametrize(
    ("address", "site"),
    [
        ("10.9.9.9", "campus"),
        ("10.1.9.9", "lab"),
        ("10.1.2.3", "lab"),
        ("10.1.2.200", "room"),
        ("11.0.0.1", None),
        ("2001:db8::1", "campus"),
        ("2001:db8:1::1", "lab"),
        ("2001:db9::1", None),
        ("::ffff:10.1.2.200", None),  # mapped addresses are unmapped by parse_origin, not here
    ],
)
def test_site_of_address_longest_prefix(address: str, site: str | None) -> None:
    reg = load_registry_text(NESTED, file=FILE)
    assert reg.site_of_address(ipaddress.ip_address(address)) == site


# --- slim registry check against the images' kernels ----------------------------------------


def fake_kernel_image(root: Path, kver: str, modules: dict[str, str], builtin: tuple[str, ...] = ()) -> Path:
    """An image with ``/vmlinuz`` → ``boot/vmlinuz-KVER`` and ``lib/modules/KVER``: ``modules``
    maps a module's path to its modules.dep dependencies; ``builtin``: modules.builtin lines."""
    mods = root / "lib" / "modules" / kver
    mods.mkdir(parents=True)
    for path in modules:
        (mods / path).parent.mkdir(parents=True, exist_ok=True)
        (mods / path).write_bytes(b"module")
    (mods / "modules.dep").write_text("".join(f"{p}: {d}\n" for p, d in modules.items()))
    (mods / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    (mods / "modules.alias").write_text("alias intel-gbe e1000\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"kernel")
    (root / "vmlinuz").symlink_to(f"boot/vmlinuz-{kver}")
    return root


INTEL = {
    "kernel/drivers/net/ethernet/intel/e1000/e1000.ko": "",
    "kernel/net/core/fail-over.ko": "",
    "kernel/drivers/net/net_failover.ko": "kernel/net/core/fail-over.ko",
}


def images_registry(tmp_path: Path, modules: str, **images: Path) -> Path:
    envs = "".join(f"  {name}: {{image: {image}}}\n" for name, image in images.items())
    file = tmp_path / "registry.yaml"
    file.write_text(
        f"profiles:\n  pc: {{modules: {modules}}}\n  vm: {{modules: [e1000]}}\nenvironments:\n{envs}"
    )
    return file


def test_profile_modules_are_read_as_modprobe_reads_them(tmp_path: Path) -> None:
    from slim.core.build.release import check_profile_modules

    image = fake_kernel_image(tmp_path / "img", "6.1.0-1-test", INTEL, builtin=("kernel/fs/ext4/ext4.ko",))
    # "-" and "_" alike both ways, a built-in module, an alias
    modules = "[e1000, fail_over, net-failover, ext4, intel_gbe]"
    found = check_profile_modules(load_registry(images_registry(tmp_path, modules, base=image)))
    assert found.problems == []
    assert found.checked == {"base": "6.1.0-1-test"} and found.skipped == {}


def test_a_module_typo_is_named_with_its_closest_match_and_line(tmp_path: Path) -> None:
    from slim.core.build.release import check_profile_modules

    intel = fake_kernel_image(tmp_path / "intel", "6.1.0-1-test", INTEL)
    virtio = fake_kernel_image(tmp_path / "virtio", "6.1.0-2-test", {"kernel/virtio_net.ko": ""})
    file = images_registry(tmp_path, "[e1000x, fail_over]", intel=intel, virtio=virtio)
    found = check_profile_modules(load_registry(file))
    lines = file.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "e1000x" in text)
    by_field = {p.field: p for p in found.problems}
    # the typo, in each kernel; e1000 and fail_over only where the kernel lacks them
    assert sorted(by_field) == ["profiles.pc.modules[0]", "profiles.pc.modules[1]", "profiles.vm.modules[0]"]
    typo = [p for p in found.problems if p.field == "profiles.pc.modules[0]"]
    assert len(typo) == 2 and all(p.line == line and p.file == str(file) for p in typo)
    assert any(
        p.message == "kernel 6.1.0-1-test has no module 'e1000x'; closest: e1000 (environment intel)"
        for p in typo
    )
    assert by_field["profiles.vm.modules[0]"].message.endswith("(environment virtio)")
    assert found.checked == {"intel": "6.1.0-1-test", "virtio": "6.1.0-2-test"}


def test_images_without_a_kernel_yet_are_skipped_with_why(tmp_path: Path) -> None:
    from slim.core.build.release import check_profile_modules

    bare = tmp_path / "bare"
    (bare / "etc").mkdir(parents=True)
    file = images_registry(tmp_path, "[nosuch]", missing=tmp_path / "nowhere", bare=bare)
    found = check_profile_modules(load_registry(file))
    assert found.problems == [] and found.checked == {}
    assert found.skipped["missing"] == f"no image at {tmp_path / 'nowhere'} yet"
    assert found.skipped["bare"] == f"no kernel at /vmlinuz in {bare} yet"
    # a kernel file whose modules are not there: what the build refuses, a problem here too
    (bare / "boot").mkdir()
    (bare / "boot" / "vmlinuz-6.1.0-9-test").write_bytes(b"kernel")
    (bare / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-9-test")
    found = check_profile_modules(load_registry(file))
    assert [p.field for p in found.problems] == ["environments.bare.kernel"], found.problems
    assert "/lib/modules/6.1.0-9-test" in found.problems[0].message


def test_an_image_without_modules_dep_is_a_problem_of_its_environment(tmp_path: Path) -> None:
    from slim.core.build.release import check_profile_modules

    image = fake_kernel_image(tmp_path / "img", "6.1.0-1-test", INTEL)
    (image / "lib" / "modules" / "6.1.0-1-test" / "modules.dep").unlink()
    found = check_profile_modules(load_registry(images_registry(tmp_path, "[e1000]", base=image)))
    assert [(p.field, p.message.split(";")[0]) for p in found.problems] == [
        ("environments.base.image", f"{image}/lib/modules/6.1.0-1-test has no modules.dep")
    ]


def test_registry_check_cli_refuses_a_typo_and_says_what_it_checked(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slim.cli import main

    image = fake_kernel_image(tmp_path / "img", "6.1.0-1-test", INTEL)
    bad = images_registry(tmp_path, "[e1000x]", base=image, later=tmp_path / "nowhere")
    result = CliRunner().invoke(main, ["registry", "check", str(bad)])
    assert result.exit_code == 1
    assert (
        "profiles.pc.modules[0]: kernel 6.1.0-1-test has no module 'e1000x'; closest: e1000" in result.output
    )
    assert (
        f"note: environment later: kernel not checked: no image at {tmp_path / 'nowhere'} yet"
        in result.output
    )
    # the file alone is fine
    result = CliRunner().invoke(main, ["registry", "check", "--no-images", str(bad)])
    assert (
        result.exit_code == 0
        and "ok (0 sites, 0 relays, 2 profiles, 2 environments, 0 nodes)" in result.output
    )
    good = images_registry(tmp_path, "[e1000]", base=image)
    result = CliRunner().invoke(main, ["registry", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "profiles' modules found in the kernels of base (6.1.0-1-test)" in result.output
