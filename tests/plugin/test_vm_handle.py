"""What a test can do with its machine: exec, check, mark_dirty, and ask for a fresh one."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Harness

#: one machine that is reused as is after each test, so only a reset removes a file
REUSE = '[pool]\ncheckin_policy = "reuse"\nsize = 1\n'
ONE_MACHINE_IN_ORDER = ("-p", "no:xdist")


def test_fresh_test_does_not_see_what_an_earlier_test_left(harness: Harness) -> None:
    (harness.path / "pool.toml").write_text(REUSE)
    harness.pytester.makepyfile(
        test_fresh="""
        import pytest

        def test_1_leaves_a_file(pool_vm):
            pool_vm.exec("touch mark", check=True)

        def test_2_reused_machine_still_has_it(pool_vm):
            assert pool_vm.exec("test -e mark").returncode == 0

        @pytest.mark.vm(fresh=True)
        def test_3_fresh_machine_does_not(pool_vm):
            assert pool_vm.exec("test -e mark").returncode == 1
        """
    )
    harness.run(*ONE_MACHINE_IN_ORDER).assert_outcomes(passed=3)
    harness.assert_nothing_left()


def test_exec_check_raises_command_failed_showing_command_and_output(harness: Harness) -> None:
    harness.pytester.makepyfile(
        test_check="""
        import pytest
        from vmpool.errors import CommandFailed

        def test_raises(pool_vm):
            with pytest.raises(CommandFailed) as info:
                pool_vm.exec("echo said-out; echo said-err >&2; exit 3", check=True)
            assert info.value.returncode == 3
            assert (info.value.stdout, info.value.stderr) == ("said-out\\n", "said-err\\n")

        def test_unchecked_failure_is_a_result(pool_vm):
            assert pool_vm.exec("exit 3").returncode == 3

        def test_fails_with_the_message(pool_vm):
            pool_vm.exec("echo shown-out; echo shown-err >&2; exit 7", check=True)
        """
    )
    result = harness.run(*ONE_MACHINE_IN_ORDER)
    result.assert_outcomes(passed=2, failed=1)
    shown = [
        "CommandFailed: command ['sh', '-c', 'echo shown-out; echo shown-err >&2; exit 7']"
        " exited 7",
        "--- stdout ---",
        "shown-out",
        "--- stderr ---",
        "shown-err",
    ]
    result.stdout.re_match_lines([rf"^E\s+.*{re.escape(line)}$" for line in shown])


def test_string_command_runs_through_sh_c_in_the_machine(harness: Harness) -> None:
    harness.pytester.makepyfile(
        test_shell="""
        def test_shell_syntax(pool_vm):
            assert pool_vm.exec("echo $((6 * 7)) | tr 4 x").stdout == "x2\\n"

        def test_argv_is_not_a_shell(pool_vm):
            assert pool_vm.exec(["echo", "$((6 * 7))"]).stdout == "$((6 * 7))\\n"

        def test_runs_in_its_own_machine(pool_vm):
            assert pool_vm.exec("echo $VMPOOL_MACHINE").stdout == pool_vm.name + "\\n"
        """
    )
    harness.run(*ONE_MACHINE_IN_ORDER).assert_outcomes(passed=3)


def test_mark_dirty_forces_a_reset_under_the_reuse_policy(harness: Harness) -> None:
    (harness.path / "pool.toml").write_text(REUSE)
    harness.pytester.makepyfile(
        test_dirty="""
        NAMES = []

        def test_1_leaves_a_file(pool_vm):
            NAMES.append(pool_vm.name)
            pool_vm.exec("touch kept", check=True)

        def test_2_leaves_a_file_and_marks_dirty(pool_vm):
            NAMES.append(pool_vm.name)
            assert pool_vm.exec("test -e kept").returncode == 0  # reuse: not reset
            pool_vm.exec("touch dirty", check=True)
            pool_vm.mark_dirty()

        def test_3_machine_was_reset(pool_vm):
            assert pool_vm.name == NAMES[0] == NAMES[1]  # the same machine, reset in place
            assert pool_vm.exec("test -e dirty").returncode == 1
            assert pool_vm.exec("test -e kept").returncode == 1
        """
    )
    result = harness.run(*ONE_MACHINE_IN_ORDER)
    result.assert_outcomes(passed=3)
    (summary,) = harness.summaries(result).values()
    assert (summary.reset, summary.replaced) == (1, 0)
    harness.assert_nothing_left()
