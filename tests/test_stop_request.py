"""tcore.stop_request in a real process: stop signals become a request, and once a stop was
requested a repeat arriving after the training block (torchrun's forwarded copy of the job's
SIGTERM) does not kill the process before it exits as it said it would."""
import signal
import subprocess
import sys
import textwrap

import pytest

# A process that asks itself to stop inside the block, as the job's SIGTERM would, then gets
# a repeat after the block (where `tcore train` is writing its last words and exiting).
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from tcore.stop_request import StopRequest

    request = StopRequest()
    with request.listening():
        if {ask_inside}:
            os.kill(os.getpid(), signal.{name})
    print("after the block:", request.signal_number, flush=True)
    os.kill(os.getpid(), signal.{name})   # delivered before the next bytecode runs
    print("survived the repeat", flush=True)
    sys.exit(128 + request.signal_number)
""")


def run_script(name: str, ask_inside: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(name=name, ask_inside=ask_inside)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_repeat_after_a_requested_stop_does_not_kill_the_process(name):
    number = signal.Signals[name].value
    done = run_script(name, ask_inside=True)
    assert done.stdout.splitlines() == [f"after the block: {number}", "survived the repeat"], \
        done.stderr
    assert done.returncode == 128 + number


def test_without_a_request_the_previous_handlers_come_back():
    # No stop asked inside the block: SIGTERM after it is the default again, which ends the
    # process by the signal itself (a negative return code from subprocess).
    done = run_script("SIGTERM", ask_inside=False)
    assert done.stdout.splitlines() == ["after the block: 0"], done.stderr
    assert done.returncode == -signal.SIGTERM
