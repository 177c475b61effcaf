"""Hostile command-line input ends in one line, never a traceback: paths the system refuses,
numbers that are not finite, bytes that are not UTF-8, a top-k beyond the vocabulary."""

import argparse
import errno

import jax.numpy as jnp
import numpy as np
import pytest

from lm import cli
from lm.sampling import decode


def test_a_refused_path_is_one_line(capsys):
    def fail(_):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x/.lock")

    assert cli._run(argparse.Namespace(fn=fail)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied: /runs/x/.lock" in err

    def bug(_):
        raise OSError(errno.EBADF, "Bad file descriptor")  # not about a path the user gave: a bug, shown as one

    with pytest.raises(OSError):
        cli._run(argparse.Namespace(fn=bug))


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_numbers_must_be_finite(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        cli._number(float, 0.0, what="0 or more")(text)


def test_text_that_is_not_utf8_is_encoded_with_replacement_characters():
    from data_pipeline.tokenizer import valid_text

    raw = b"\xff\xfe caf\xc3\xa9".decode("utf-8", "surrogateescape")  # what argv and input() give
    assert valid_text(raw) == "\ufffd\ufffd caf\u00e9"
    assert valid_text("a\ud800b") == "a?b" or valid_text("a\ud800b") == "a\ufffdb"
    assert valid_text("plain") == "plain"


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50)), jnp.float32)
    np.testing.assert_array_equal(decode.filter_logits(logits, 1000, 1.0), logits)


@pytest.mark.parametrize("flags, says", [
    (dict(num_processes=None, process_id=None), "--coordinator needs --num-processes N and --process-id I"),
    (dict(num_processes=2, process_id=2), "--process-id 2 is out of range: 0 to 1"),
])
def test_multi_process_flags_that_do_not_fit_are_one_line(capsys, flags, says):
    args = argparse.Namespace(fn=cli.cmd_reward, coordinator="127.0.0.1:1", cpu_collectives=False, **flags)
    assert cli._run(args) == 2  # (before any attempt to reach the coordinator)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
