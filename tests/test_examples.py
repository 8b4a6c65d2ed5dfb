"""The examples run as users run them (a fresh process, the repository's interpreter) and say
what they promise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the example sets it
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quickstart_is_bit_exact_with_passes_off_and_prints_the_report():
    out = _run("quickstart.py")
    assert "passes off: logits equal to eager bit for bit: True" in out
    assert "low_rank" in out and "rewritten" in out and "next-token agreement" in out


@pytest.mark.slow
def test_triton_lowering_example_generates_the_same_tokens_as_eager():
    out = _run("triton_lowering.py")
    assert "greedy tokens with the kernels equal those of the same graph run eagerly: True" in out
    assert "low_rank_linear_silu_mul" in out and "library: linear x9" in out
