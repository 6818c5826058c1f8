"""Credential commands run from a small helper process, never forked from the server itself."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import uvloop

from edge.metadata.credentials import CredentialSourceError, ProcessSource
from edge.metadata.spawner import CommandError, CommandRunner
from edge.view.model import Instance, Interface
from tests.support import process_gone

INSTANCE = Instance(id="i-0123", account_id="000123456789",
                    interfaces=(Interface("eni-1", "d0:0d:00:00:00:01", 0, "", None, ("10.0.0.5",)),))


def test_commands_are_children_of_the_helper_not_of_the_server() -> None:
    runner = CommandRunner()

    async def scenario():
        rc, out, err = await runner.run(["sh", "-c", "echo $PPID; echo oops >&2; exit 3"])
        assert rc == 3 and err == b"oops\n"
        parent = int(out)
        assert parent != os.getpid()
        with open(f"/proc/{parent}/cmdline", "rb") as handle:
            assert b"edge.metadata.spawner" in handle.read()
        await runner.close()

    uvloop.run(scenario())


def test_concurrent_commands_and_missing_programs() -> None:
    runner = CommandRunner()

    async def scenario():
        results = await asyncio.gather(*(runner.run(["sh", "-c", f"sleep 0.2; echo {n}"]) for n in range(20)))
        assert sorted(int(out) for _, out, _ in results) == list(range(20))
        with pytest.raises(CommandError, match="cannot run /nonexistent/credential-helper"):
            await runner.run(["/nonexistent/credential-helper"])
        await runner.close()

    uvloop.run(scenario())


def test_cancelling_a_call_kills_its_command(tmp_path) -> None:
    runner = CommandRunner()
    marker = tmp_path / "finished"

    async def scenario():
        task = asyncio.create_task(runner.run(["sh", "-c", f"sleep 1; touch {marker}"]))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.2)
        assert not marker.exists()
        await runner.close()

    uvloop.run(scenario())


async def _kill_helper(runner: CommandRunner) -> asyncio.subprocess.Process:
    """SIGKILL the runner's helper (as the OOM killer would) and wait until it is gone."""
    helper = runner._process
    assert helper is not None
    os.kill(helper.pid, signal.SIGKILL)
    await helper.wait()
    return helper


def test_a_dead_helper_is_replaced(tmp_path) -> None:
    script = tmp_path / "creds.sh"
    script.write_text('#!/bin/sh\nprintf \'{"Version": 1, "AccessKeyId": "AKID%s", "SecretAccessKey": "s", '
                      '"SessionToken": "t", "Expiration": "2099-01-01T00:00:00Z"}\' "$1"\n')
    script.chmod(0o755)
    source = ProcessSource((str(script), "{instance_id}"))

    async def scenario():
        first = await source(INSTANCE, "10.0.0.5", "web")
        assert first.access_key_id == "AKIDi-0123"
        helper = await _kill_helper(source.runner)
        await asyncio.sleep(0.1)
        second = await source(INSTANCE, "10.0.0.5", "web")
        assert second.access_key_id == "AKIDi-0123"
        assert source.runner._process is not None and source.runner._process.pid != helper.pid
        bad = ProcessSource(("/nonexistent/creds",), runner=source.runner)
        with pytest.raises(CredentialSourceError, match="cannot run"):
            await bad(INSTANCE, "10.0.0.5", "web")
        await source.runner.close()

    uvloop.run(scenario())


def test_only_an_unexpected_helper_exit_is_logged(caplog) -> None:
    runner = CommandRunner()

    async def scenario():
        await runner.run(["true"])
        await _kill_helper(runner)
        await asyncio.sleep(0.2)
        assert "credential command helper exited" in caplog.text
        caplog.clear()
        await runner.run(["true"])  # a new helper
        await runner.close()
        await asyncio.sleep(0.2)

    with caplog.at_level("WARNING", logger="edge.metadata"):
        uvloop.run(scenario())
    assert "credential command helper exited" not in caplog.text


def _instance(number: int) -> Instance:
    return Instance(id=f"i-{number:04d}", account_id="000123456789",
                    interfaces=(Interface(f"eni-{number}", f"d0:0d:00:00:00:{number:02x}", 0, "", None,
                                          (f"10.0.0.{number}",)),))


def test_concurrent_calls_with_the_same_command_line_share_one_run(tmp_path) -> None:
    script = tmp_path / "creds.sh"
    count = tmp_path / "runs"
    script.write_text(f'#!/bin/sh\necho x >> {count}\nsleep 0.3\n'
                      'printf \'{"Version": 1, "AccessKeyId": "AKID%s", "SecretAccessKey": "s", '
                      '"SessionToken": "t", "Expiration": "2099-01-01T00:00:00Z"}\' "$1"\n')
    script.chmod(0o755)
    per_role = ProcessSource((str(script), "{account_id}-{role}"))
    per_instance = ProcessSource((str(script), "{instance_id}"), runner=per_role.runner)

    async def scenario():
        shared = await asyncio.gather(*(per_role(_instance(n), f"10.0.0.{n}", "web") for n in range(1, 21)))
        assert {c.access_key_id for c in shared} == {"AKID000123456789-web"}
        assert per_role.runs == 1 and count.read_text().count("x") == 1
        own = await asyncio.gather(*(per_instance(_instance(n), f"10.0.0.{n}", "web") for n in range(1, 11)))
        assert sorted(c.access_key_id for c in own) == sorted(f"AKIDi-{n:04d}" for n in range(1, 11))
        assert per_instance.runs == 10
        # Once a run is over, the next call starts a new one.
        await per_role(_instance(1), "10.0.0.1", "web")
        assert per_role.runs == 2
        await per_role.runner.close()

    uvloop.run(scenario())


def test_a_shared_run_stops_only_when_every_caller_gave_up(tmp_path) -> None:
    script = tmp_path / "slow.sh"
    marker = tmp_path / "finished"
    script.write_text(f'#!/bin/sh\nsleep 1\ntouch {marker}\n'
                      'printf \'{"Version": 1, "AccessKeyId": "A", "SecretAccessKey": "s", '
                      '"Expiration": "2099-01-01T00:00:00Z"}\'\n')
    script.chmod(0o755)
    source = ProcessSource((str(script), "{role}"))

    async def scenario():
        impatient = asyncio.create_task(source(_instance(1), "10.0.0.1", "web"))
        patient = asyncio.create_task(source(_instance(2), "10.0.0.2", "web"))
        await asyncio.sleep(0.2)
        impatient.cancel()
        assert (await patient).access_key_id == "A"  # the other caller's cancel did not stop the run
        assert marker.exists()
        marker.unlink()
        lone = asyncio.create_task(source(_instance(3), "10.0.0.3", "db"))
        await asyncio.sleep(0.2)
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        await asyncio.sleep(1.2)
        assert not marker.exists()  # the last caller gave up: the command was stopped
        await source.runner.close()

    uvloop.run(scenario())


def _printing_script(tmp_path, name: str = "print.py") -> str:
    """A credential command printing valid credentials padded to ``argv[1]`` bytes."""
    script = tmp_path / name
    script.write_text(
        "import json, sys\n"
        "size = int(sys.argv[1])\n"
        "doc = {'Version': 1, 'AccessKeyId': 'AKID', 'SecretAccessKey': 's', 'SessionToken': 't',\n"
        "       'Expiration': '2099-01-01T00:00:00Z', 'Padding': ''}\n"
        "doc['Padding'] = 'x' * max(0, size - len(json.dumps(doc)))\n"
        "sys.stdout.write(json.dumps(doc))\n")
    return str(script)


def test_output_of_any_size_up_to_the_cap_then_a_clear_error_for_that_call_only(tmp_path) -> None:
    import sys
    script = _printing_script(tmp_path)
    runner = CommandRunner()
    small = ProcessSource((sys.executable, script, "{role}"), runner=runner)
    large = ProcessSource((sys.executable, script, "{role}"), runner=runner, max_output=2 * 1024 * 1024)

    async def scenario():
        # 60 KB of output is a base64 line over asyncio's 64 KiB line limit: it used to kill the reader.
        helper = None
        for size in ("61440", "1048576"):
            if size == "1048576":
                with pytest.raises(CredentialSourceError, match=r"printed more than 65536 bytes"):
                    await asyncio.wait_for(small(INSTANCE, "10.0.0.5", size), 10)
            else:
                assert (await asyncio.wait_for(small(INSTANCE, "10.0.0.5", size), 10)).access_key_id == "AKID"
            helper = helper or runner._process
            # The same helper keeps serving: a normal call succeeds at once.
            assert (await asyncio.wait_for(small(INSTANCE, "10.0.0.5", "100"), 10)).access_key_id == "AKID"
            assert runner._process is helper
        # A cap raised in the configuration lets the 1 MB answer through.
        assert (await asyncio.wait_for(large(INSTANCE, "10.0.0.5", "1048576"), 10)).access_key_id == "AKID"
        assert runner.failures == {"exited": 0, "protocol": 0}
        await runner.close()

    uvloop.run(scenario())


def test_a_helper_that_answers_garbage_is_logged_counted_and_replaced(tmp_path, caplog) -> None:
    import sys
    garbage = tmp_path / "garbage.py"
    # Reads one request, then writes a frame header announcing far more than any answer can be.
    garbage.write_text("import sys\nsys.stdin.buffer.read(4)\nsys.stdout.buffer.write(b'\\xff\\xff\\xff\\xffjunk')\n"
                       "sys.stdout.flush()\nimport time\ntime.sleep(30)\n")
    runner = CommandRunner(helper=(sys.executable, str(garbage)))

    async def scenario():
        with pytest.raises(CommandError, match="command helper broke"):
            await asyncio.wait_for(runner.run(["true"]), 10)
        broken = runner._process
        assert runner.failures["protocol"] == 1
        # The next call starts a working helper.
        runner.helper = CommandRunner().helper
        assert (await asyncio.wait_for(runner.run(["sh", "-c", "echo ok"]), 10))[1] == b"ok\n"
        assert runner._process is not broken
        await runner.close()

    with caplog.at_level("ERROR", logger="edge.metadata"):
        uvloop.run(scenario())
    assert "credential command helper stopped: protocol error (frame of 4294967295 bytes" in caplog.text


def test_a_helper_that_exits_is_counted(tmp_path) -> None:
    runner = CommandRunner()

    async def scenario():
        await runner.run(["true"])
        await _kill_helper(runner)
        for _ in range(400):
            if runner.failures["exited"]:
                break
            await asyncio.sleep(0.05)
        assert runner.failures == {"exited": 1, "protocol": 0}
        await runner.run(["true"])
        await runner.close()
        assert runner.failures == {"exited": 1, "protocol": 0}  # a helper we stopped is not a failure

    uvloop.run(scenario())


def test_a_garbled_answer_stops_the_helper_and_the_commands_it_runs(tmp_path, caplog) -> None:
    pid_file = tmp_path / "pid"
    runner = CommandRunner()

    async def scenario():
        call = asyncio.create_task(runner.run(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"]))
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        command = int(pid_file.read_text())
        helper = runner._process
        assert helper is not None and helper.stdout is not None
        helper.stdout.feed_data(b"\x00\x00\x00\x05{nope")  # a frame that is not JSON, as if from the helper
        with pytest.raises(CommandError, match="not JSON"):
            await asyncio.wait_for(call, 10)
        assert runner.failures["protocol"] == 1
        await asyncio.wait_for(helper.wait(), 10)
        for _ in range(200):  # the command went with its helper (SIGKILL to the group)
            if process_gone(command):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the command outlived its broken helper")
        assert (await asyncio.wait_for(runner.run(["sh", "-c", "echo again"]), 10))[1] == b"again\n"
        await runner.close()

    with caplog.at_level("ERROR", logger="edge.metadata"):
        uvloop.run(scenario())
    assert "credential command helper stopped: protocol error (frame of 5 bytes is not JSON)" in caplog.text
