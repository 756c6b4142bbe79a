"""The JSONC reader: comments outside strings only, trailing commas, substitutions kept."""

from __future__ import annotations

import json

import pytest

from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.contacts import parse_url
from egress_guard.opencode.jsonc import ConfigError, Placeholder, parse_jsonc


def data(text: str) -> dict[str, object]:
    return parse_jsonc(text, "t.jsonc").data


def test_comments_are_removed_outside_strings_only() -> None:
    text = """{
      // line comment with "quotes" and a URL https://x.example/y
      "url": "https://api.example.com//v1", /* block */ "glob": "/*.md",
      "quoted": "a \\"// not a comment\\" b",
      /* multi
         line */ "n": 1 // comment at the end without a newline"""
    assert data(text + "\n}") == {
        "url": "https://api.example.com//v1",
        "glob": "/*.md",
        "quoted": 'a "// not a comment" b',
        "n": 1,
    }


def test_trailing_commas_and_plain_json_agree_with_json_module() -> None:
    plain = '{"a": [1, 2.5, -3e2, true, false, null], "b": {"c": "\\u00e9\\ud83d\\ude00\\n"}}'
    assert data(plain) == json.loads(plain)
    assert data('{"a": [1, 2,], "b": {"c": 1,},}') == {"a": [1, 2], "b": {"c": 1}}


def test_whole_value_substitutions_parse_as_placeholders() -> None:
    d = data('{"autoupdate": {env:AU}, "key": "{file:~/.secrets/key}", "u": "https://{env:H}/v1"}')
    assert d["autoupdate"] == Placeholder("{env:AU}")
    assert d["key"] == "{file:~/.secrets/key}"  # inside a string: text, never resolved
    assert d["u"] == "https://{env:H}/v1"


def test_duplicate_keys_last_wins_like_json_parse() -> None:
    assert data('{"share": "auto", "share": "disabled"}') == {"share": "disabled"}


def test_lines_are_recorded_for_keys() -> None:
    doc = parse_jsonc(
        '{\n  // c\n  "provider": {\n    "x": {"options": {\n "baseURL": "u"}}}}', "f"
    )
    assert doc.lines[("provider",)] == 3
    assert doc.lines[("provider", "x", "options", "baseURL")] == 5


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('{\n  "a": 1\n  "b": 2\n}', 2, "expected ',' or '}'"),
        ('{\n  "a": /* never closed\n}', 2, "unterminated /* comment"),
        ('{\n\n  "a": "x\n y"\n}', 3, "control character"),
        ('{"a": 1,,}', 1, "property name"),
        ("{\n 'a': 1}", 2, "property name in double quotes"),
        ('{"a": tru}', 1, "expected a value"),
        ('{"a": 1} {"b": 2}', 1, "after the end"),
        ("", 1, "empty"),
        ('{"a": "\\x"}', 1, "invalid escape"),
        ('{"a": [1, 2}', 1, "expected ',' or ']'"),
        ('{"a": 01}', 1, "expected ',' or '}'"),
    ],
)
def test_syntax_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_jsonc(text, "opencode.json")
    assert e.value.line == line
    assert fragment in e.value.message
    assert e.value.render().startswith(f"opencode.json:{line}: ")


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_jsonc("[1, 2]", "f")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError, match="nested more than"):
        parse_jsonc('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "f")


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ('{\n "autoupdate": "yes"}', 2, 'autoupdate: must be true, false or "notify"'),
        ('{\n "share": "public"}', 2, "share: must be"),
        ('{"provider": {\n "x": {"options": {\n "baseURL": 5}}}}', 3, "baseURL: must be a string"),
        ('{"model": ["a"]}', 1, "model: must be a string"),
        ('{"server": {\n "cors": "*"}}', 2, "server.cors: must be an array of strings"),
    ],
)
def test_shape_errors_opencode_would_refuse(text: str, where: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        OpenCodeConfig.from_doc(parse_jsonc(text, "oc.json"))
    assert e.value.line == where
    assert fragment in e.value.message


def test_unreadable_and_non_utf8_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{\n"model": "\xff"}')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.line == 2


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("https://llm.corp.example:8443/v1", "llm.corp.example", 8443, "/v1"),
        ("http://localhost:11434/api", "localhost", 11434, "/api"),
        ("https://API.Example.COM./v1?x=1", "api.example.com", 443, "/v1"),
        ("http://[::1]:1234/v1", "::1", 1234, "/v1"),
        ("http://user:pw@10.1.2.3/", "10.1.2.3", 80, "/"),
        ("https://bücher.example/v1", "xn--bcher-kva.example", 443, "/v1"),
    ],
)
def test_url_endpoints(url: str, host: str, port: int, path: str) -> None:
    ep, unresolved, problem = parse_url(url)
    assert (unresolved, problem) == (False, None)
    assert ep is not None
    assert (ep.host, ep.port, ep.path) == (host, port, path)


@pytest.mark.parametrize(
    ("url", "unresolved"),
    [
        ("{env:BASE_URL}", True),
        ("https://{env:HOST}/v1", True),
        ("https://host:{env:PORT}/v1", True),
        ("ftp://x.example/", False),
        ("llm.example.com/v1", False),
        ("https://bad host/v1", False),
        ("https://x.example:99999/", False),
    ],
)
def test_urls_without_a_usable_host(url: str, unresolved: bool) -> None:
    ep, got_unresolved, problem = parse_url(url)
    assert ep is None
    assert got_unresolved is unresolved
    assert (problem is None) is unresolved


def test_substitution_only_in_the_path_keeps_the_host() -> None:
    ep, unresolved, _ = parse_url("https://gw.example/{env:TENANT}/v1")
    assert ep is not None and not unresolved
    assert ep.host == "gw.example"
