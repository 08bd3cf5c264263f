"""Bad configuration or marker arguments: exit code 4 naming the culprit, and no machine made."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Harness

ONE_TEST = """
def test_uses_a_machine(pool_vm):
    assert pool_vm.exec("true").ok
"""


def _assert_usage_error(harness: Harness, result: pytest.RunResult, *expected: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, harness.output(result)
    output = harness.output(result)
    for text in expected:
        assert text in output
    assert harness.creates() == 0
    harness.assert_nothing_left()


@pytest.mark.parametrize(
    ("args", "env", "pool_toml", "expected"),
    [
        pytest.param(
            ["--vm-pool-size", "0"], {}, None, ["--vm-pool-size: must be >= 1"], id="size-0"
        ),
        pytest.param(
            [], {"VMPOOL_SIZE": "abc"}, None, ["VMPOOL_SIZE: must be an integer"], id="env-abc"
        ),
        pytest.param(
            [],
            {},
            "[pool]\nszie = 2\n",
            ["pool.szie: unknown key (did you mean 'size'?)"],
            id="misspelt-key",
        ),
        pytest.param([], {}, "[pool\nsize = 2\n", ["pool.toml: invalid TOML"], id="bad-toml"),
        pytest.param(
            ["--vm-backend", "nope"],
            {},
            None,
            ["--vm-backend: must be one of", "'nope'"],
            id="backend-nope",
        ),
        pytest.param(
            ["--vm-pool-config", "missing.toml"],
            {},
            None,
            ["--vm-pool-config: missing.toml: file not found"],
            id="config-missing",
        ),
    ],
)
def test_bad_setting_is_a_usage_error_naming_it(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    pool_toml: str | None,
    expected: list[str],
) -> None:
    harness.pytester.makepyfile(test_one=ONE_TEST)
    if pool_toml is not None:
        (harness.path / "pool.toml").write_text(pool_toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # the harness passes --vm-backend sim first; a later --vm-backend wins
    result = harness.run("-p", "no:xdist", *args)
    _assert_usage_error(harness, result, *expected)


def test_unknown_marker_argument_is_a_usage_error_naming_the_test(harness: Harness) -> None:
    harness.pytester.makepyfile(
        test_marker="""
        import pytest

        @pytest.mark.vm(cuont=2)
        def test_misspelt(pool_vm):
            pass
        """
    )
    result = harness.run("-p", "no:xdist")
    _assert_usage_error(
        harness, result, "test_marker.py::test_misspelt", "unknown argument(s) ['cuont']"
    )


@pytest.mark.parametrize(
    "mode",
    [pytest.param(["-p", "no:xdist"], id="no-xdist"),
     pytest.param(["-n", "2"], id="n2", marks=pytest.mark.slow)],
)
def test_count_larger_than_pool_is_a_usage_error_naming_test_count_and_size(
    harness: Harness, mode: list[str]
) -> None:
    harness.pytester.makepyfile(
        test_count="""
        import pytest

        def test_small(pool_vm):
            pass

        @pytest.mark.vm(count=5)
        def test_too_many(pool_vms):
            pass
        """
    )
    result = harness.run(*mode, "--vm-pool-size", "2")
    _assert_usage_error(harness, result, "test_count.py::test_too_many", "count=5", "has size 2")
    assert "test_small PASSED" not in harness.output(result)  # nothing runs


def test_unknown_profile_is_a_usage_error_with_did_you_mean(harness: Harness) -> None:
    (harness.path / "pool.toml").write_text("[profiles.big]\nsize = 1\n")
    harness.pytester.makepyfile(
        test_profile="""
        import pytest

        @pytest.mark.vm(profile="bgi")
        def test_typo(pool_vm):
            pass
        """
    )
    result = harness.run("-p", "no:xdist")
    _assert_usage_error(
        harness,
        result,
        "test_profile.py::test_typo",
        "unknown profile 'bgi' (did you mean 'big'?)",
    )
