"""Training on your own data: files through Grain, tokenizer, eval, resume, sampling, config, TB.

Cost: one compiled tiny-GPT program family serves the end-to-end checks (train + eval + resume +
sample + eval on a second mesh); the loader, file and config checks compile nothing; the
2-process check is one short ``meshpar launch`` beside a 1-process run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from meshpar.cli import main as cli_main
from meshpar.cli.args import build_parser
from meshpar.cli.config import parse_args
from meshpar.errors import DataError, UsageError
from meshpar.train.files import open_token_files, resolve_files
from meshpar.train.loader import ShardedBatches
from meshpar.train.tokenizer import Tokenizer

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}." for i in range(400))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two text files, their bytes as .bin (uint16) and .npy, a trained BPE tokenizer, and
    mixed/: a text file and a token file of that tokenizer."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    (root / "b.txt").write_text(TEXT[len(TEXT) // 2:])
    ids = np.frombuffer(TEXT.encode(), np.uint8)
    ids.astype(np.uint16).tofile(root / "t.bin")
    np.save(root / "t.npy", ids.astype(np.int32))
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tok.json"))
    # What the runs train on: a text file and a token file (the rest of the text, pre-tokenised).
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    np.array(tok.encode(TEXT[len(TEXT) // 2:]).ids, np.uint16).tofile(root / "mixed" / "b.bin")
    return root


def test_token_files_text_and_tokenizer_round_trip(files):
    tok = Tokenizer(str(files / "tok.json"))
    assert 256 < tok.vocab_size <= 300
    sample = "Line 3: the quick brown fox, é!"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level BPE: lossless
    assert len(tok.encode(TEXT)) < len(TEXT.encode()) / 2  # it merged something
    assert Tokenizer().decode(Tokenizer().encode(sample)) == sample
    # .bin, .npy and text with bytes: the same windows, file boundaries respected.
    kinds = [open_token_files([str(files / n)], seq_len=32, vocab_size=256) for n in ("t.bin", "t.npy")]
    text = open_token_files(resolve_files(str(files / "*.txt")), seq_len=32, vocab_size=256)
    assert len(kinds[0]) == len(kinds[1]) == (len(TEXT.encode()) - 1) // 32
    assert all((kinds[0][i] == kinds[1][i]).all() for i in (0, 5, len(kinds[0]) - 1))
    assert (text[0] == kinds[0][0]).all() and text[0].dtype == np.int32 and text[0].shape == (33,)
    assert text.names == (str(files / "a.txt"), str(files / "b.txt"))
    train, held = text.split(7)
    assert len(held) == 7 and len(train) == len(text) - 7
    assert (held[6] == text[len(text) - 1]).all() and (train[len(train) - 1] == text[len(train) - 1]).all()


def test_bad_data_is_a_clear_error(files, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("tiny")
    np.array([1, 2, 300, 4], np.uint16).tofile(tmp_path / "big.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    cases = [
        (lambda: resolve_files(str(tmp_path / "nope*.txt")), r"--data '.*nope\*\.txt' matches no file"),
        (lambda: open_token_files([str(tmp_path / "empty.txt")], seq_len=8, vocab_size=256), r"empty\.txt is empty"),
        (lambda: open_token_files([str(tmp_path / "short.txt")], seq_len=8, vocab_size=256),
         r"too short for --seq-len 8: a training row needs 9 consecutive tokens of one file, and the longest has 4"),
        (lambda: open_token_files([str(tmp_path / "big.bin")], seq_len=2, vocab_size=256),
         r"big\.bin holds token id 300 at position 2, outside the model's vocabulary \[0, 256\)"),
        (lambda: open_token_files([str(tmp_path / "odd.bin")], seq_len=2, vocab_size=256, token_dtype="uint32"),
         r"has 3 bytes, not a whole number of --token-dtype uint32 tokens"),
        (lambda: open_token_files([str(files / "a.txt")], seq_len=8, vocab_size=256,
                                  tokenizer=Tokenizer(str(files / "tok.json"))),
         r"its vocabulary has \d+ tokens but the model's --vocab-size is 256; pass --vocab-size \d+"),
        (lambda: ShardedBatches(open_token_files([str(files / "t.bin")], seq_len=32, vocab_size=256),
                                batch_size=10**6), r"fewer than one batch of --batch-size 1000000"),
    ]
    for make, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            make()


def test_loader_rows_are_disjoint_per_process_and_resume_bitwise(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "ids.bin")  # every window distinct
    windows = open_token_files([str(tmp_path / "ids.bin")], seq_len=16, vocab_size=4096)
    whole = ShardedBatches(windows, batch_size=8, seed=3)
    # Two processes owning rows {0..3} and {4..7} of each global batch (what local_slice gives
    # with data=2 over 2 processes): disjoint reads that make up the one-process batch.
    parts = [ShardedBatches(windows, batch_size=8, seed=3, rows=r) for r in (range(0, 4), range(4, 8))]
    seen = set()
    epoch = len(windows) // 8 + 2  # past an epoch boundary: a new shuffle order
    for step in range(epoch):
        a, b = parts[0].batch(step)["inputs"], parts[1].batch(step)["inputs"]
        np.testing.assert_array_equal(np.concatenate([a, b]), whole.batch(step)["inputs"])
        assert not {r.tobytes() for r in a} & {r.tobytes() for r in b}
        seen |= {r.tobytes() for r in np.concatenate([a, b])}
    assert len(seen) == len(windows)  # every window once per epoch
    # Grain iterator state: interrupted after 5 batches, resumed in a new iterator = bitwise.
    it = whole.iterator()
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint metadata stores
    rest = [next(it) for _ in range(3)]
    again = whole.iterator(state)
    for expect in rest:
        got = next(again)
        assert got["inputs"].tobytes() == expect["inputs"].tobytes()
        assert got["targets"].tobytes() == expect["targets"].tobytes()
    np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])
    other = ShardedBatches(windows, batch_size=8, seed=4)
    assert not np.array_equal(other.batch(0)["inputs"], whole.batch(0)["inputs"])


def _parse(argv):
    return parse_args(build_parser(), argv)


def test_config_file_precedence_and_errors(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('batch-size = 16\nsteps = 7\nlr = 1\nmesh = "data=8"\nno-progress = true\n'
                   'lr-schedule = "linear"\n')
    args = _parse(["train", "--config", str(cfg), "--steps", "3"])
    assert (args.batch_size, args.steps, args.lr, args.mesh, args.no_progress, args.lr_schedule) == \
        (16, 3, 1.0, "data=8", True, "linear")
    assert _parse(["train"]).batch_size == 32  # the parser's defaults are left as they were
    cfg.write_text('json = true\nmesh = "data=8"\n')
    assert (_parse(["inspect", "--config", str(cfg)]).json, _parse(["inspect", "--config", str(cfg)]).mesh) == (True, "data=8")
    with pytest.raises(UsageError, match=r"unknown key 'json' for meshpar sample"):
        _parse(["sample", "--config", str(cfg), "--checkpoint-dir", "c", "--prompt", "p"])
    for text, pattern in [
        ("batch_size = 4", r"unknown key 'batch_size' for meshpar train; did you mean 'batch-size'\?"),
        ("stepz = 4", r"unknown key 'stepz' for meshpar train; did you mean 'steps'\?"),
        ("steps = 'many'", r"steps = 'many': must be an integer"),
        ("lr-schedule = 'cos'", r"must be one of cosine, linear, constant"),
        ("no-progress = 1", r"must be true or false"),
        ("steps = ", r"not valid TOML"),
    ]:
        cfg.write_text(text + "\n")
        with pytest.raises(UsageError, match=pattern):
            _parse(["train", "--config", str(cfg)])
    with pytest.raises(UsageError, match="no such file"):
        _parse(["train", "--config", str(tmp_path / "missing.toml")])


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


MESH = "data=4,tensor=2"  # 2 processes x 4 devices: each owns the rows of 2 of the 4 data shards


@pytest.fixture(scope="module")
def text_run(files, tmp_path_factory):
    """One run on a text file and a token file (config file + overrides) with eval, TensorBoard, checkpoints and a
    sample at the end, in this process: the reference of the resume, mesh and 2-process tests."""
    root = tmp_path_factory.mktemp("run")
    config = root / "run.toml"
    config.write_text(f'preset = "tiny"\nseq-len = 32\nbatch-size = 16\nsteps = 9\nvocab-size = 320\n'
                      f'data = "{files}/mixed/*"\ntokenizer = "{files / "tok.json"}"\n'
                      'eval-fraction = 0.25\neval-every = 2\neval-batches = 2\nno-progress = true\n')
    common = ["--config", str(config), "--steps", "4", "--mesh", MESH, "--sample-tokens", "8",
              "--lr-schedule", "linear", "--warmup-steps", "1"]
    run = {"root": root, "common": common, "ck": root / "ck", "tb": root / "tb",
           "metrics": root / "m.jsonl"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["train", *common, "--metrics-file", str(run["metrics"]), "--tensorboard",
                         str(run["tb"]), "--checkpoint-dir", str(run["ck"]),
                         "--checkpoint-every", "2"]) == 0
    run["out"] = out.getvalue()
    return run


def test_text_files_train_eval_tensorboard_resume_and_sample(files, text_run, tmp_path, capsys):
    """The text run's outputs; kill + resume; eval and greedy sample on a second mesh."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from meshpar.cli.sample import load_trainer
    from meshpar.cli.train import evaluate
    from meshpar.train.generate import generate

    ck, tb, metrics, out = text_run["ck"], text_run["tb"], text_run["metrics"], text_run["out"]
    common = ["train", *text_run["common"]]
    assert re.search(r"data: 2 file\(s\) .* tokenizer .*tok\.json; unigram entropy", out), out
    assert re.search(r"eval loss \d+\.\d+, perplexity \d+\.\d+", out) and "sample: " in out, out
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # --steps 4 on the command line beat 9
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True]
    assert rows[1]["eval_perplexity"] == pytest.approx(np.exp(rows[1]["eval_loss"]))
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-3, 5e-3 * 0.7, 5e-3 * 0.4])
    assert 'steps = 4' in (ck / "config.toml").read_text()
    assert (text_run["root"] / "m.config.toml").exists() and (ck / "tokenizer.json").exists()
    # TensorBoard's own reader.
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"} <= tags
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")], [r["loss"] for r in rows], rtol=1e-6)

    # Kill after the step-2 checkpoint (drop step 4) and resume: the same batches, bitwise the
    # same losses as the uninterrupted run.
    resumed, metrics2 = tmp_path / "ck2", tmp_path / "m2.jsonl"
    shutil.copytree(ck, resumed)
    shutil.rmtree(resumed / "4")
    assert cli_main([*common, "--metrics-file", str(metrics2), "--checkpoint-dir", str(resumed),
                     "--resume", "--sample-tokens", "0"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    again = _rows(metrics2)
    assert [r["step"] for r in again] == [2, 3]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[2:]]  # exact
    assert again[1]["eval_loss"] == rows[3]["eval_loss"]
    # A resume with other data is refused before training.
    assert cli_main([*common, "--checkpoint-dir", str(resumed), "--resume",
                     "--eval-fraction", "0.3"]) == 2
    assert "held out --eval-fraction 0.25 of --data, this run 0.3" in capsys.readouterr().err
    assert cli_main([*common, "--checkpoint-dir", str(resumed), "--resume",
                     "--data", str(files / "*.txt")]) == 2
    assert "was trained on other data (files:" in capsys.readouterr().err

    # The step-4 checkpoint on another mesh: the eval loss and the greedy sample of the
    # training mesh (data=4,tensor=2), from the `meshpar sample` command too.
    from meshpar.cli.data import build_data

    mesh = argparse.Namespace(mesh="fsdp=2,tensor=4", strategy="auto", zero=None,
                              sequence_parallel=False, schedule="gpipe", repeats=1)
    trainer, _ = load_trainer(str(ck), mesh)
    data = build_data(_parse(common), vocab_size=320, seq_len=32, batch_rows=np.arange(16),
                      local_rows=lambda b: b)
    assert evaluate(trainer, data.eval_iter())[0] == pytest.approx(rows[3]["eval_loss"], rel=2e-5)
    tok = Tokenizer(str(ck / "tokenizer.json"))
    text = tok.decode(generate(trainer, data.prompt, max_tokens=8, seq_len=32))
    sample = re.search(r"^sample: (.*) -> (.*)$", out, re.M)
    assert sample.group(2) == repr(text), (sample.group(0), text)
    prompt = tok.decode(data.prompt)
    assert cli_main(["sample", "--checkpoint-dir", str(ck), "--prompt", prompt, "--max-tokens", "8",
                     "--mesh", "fsdp=2,tensor=4"]) == 0
    assert capsys.readouterr().out == prompt + text + "\n"
    assert cli_main(["sample", "--checkpoint-dir", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_usage_errors_come_before_anything_compiles(files, tmp_path, capsys):
    base = ["train", "--preset", "tiny", "--seq-len", "32", "--batch-size", "16", "--no-progress",
            "--mesh", "data=8", "--sample-tokens", "0"]
    for extra, pattern in [
        (["--data", str(tmp_path / "none*.bin")], r"matches no file"),
        (["--data", str(files / "t.bin"), "--vocab-size", "100"],
         r"token id \d+ at position \d+, outside the model's vocabulary \[0, 100\)"),
        (["--data", str(files / "a.txt"), "--tokenizer", str(files / "tok.json")],
         r"its vocabulary has \d+ tokens but the model's --vocab-size is 256"),
        (["--eval-every", "2"], r"--eval-every needs held-out data"),
        (["--data", str(files / "t.bin"), "--eval-every", "1", "--eval-fraction", "0.1",
          "--eval-batches", "50"], r"--eval-batches 50: the held-out data has only [1-9] batch"),
        (["--data", str(files / "t.bin"), "--eval-every", "1", "--eval-fraction", "0.01"],
         r"the held-out data \(the last \d+ windows of --data\) has \d+ windows of --seq-len 32 "
         r"\+ 1 tokens, fewer than one batch of --batch-size 16"),
        (["--eval-fraction", "0.1"], r"--eval-fraction holds out part of --data"),
        (["--eval-batches", "2"], r"--eval-batches is used only with --eval-every N"),
        (["--data", str(files / "a.txt"), "--token-dtype", "uint16"],
         r"--token-dtype uint16 is for .bin token files, and --data/--eval-data name none"),
        (["--data", str(files / "t.bin"), "--token-dtype", "uint32"], r"not a whole number of "
         r"--token-dtype uint32 tokens|token id \d+ at position"),
        (["--warmup-steps", "5", "--steps", "5"], r"--warmup-steps 5 must be below --steps 5"),
    ]:
        assert cli_main([*base, "--steps", "1", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(pattern, err), (extra, err)
        assert err.startswith("meshpar train: error: ") and err.count("\n") == 1


def test_two_processes_read_their_rows_and_train_like_one(text_run, tmp_path):
    """The text run again as 2 processes x 4 devices, each reading only its rows of every global
    batch (``ShardedBatches(rows=...)``, checked in the loader test): the same losses, eval
    losses and greedy sample as the one-process run."""
    from test_multiprocess_train import launch

    metrics = tmp_path / "two.jsonl"
    rc, out, _ = launch("--processes", "2", "--cpu-devices-per-process", "4", "--", "train",
                        *text_run["common"], "--metrics-file", str(metrics))
    assert rc == 0, out[-4000:]
    two, one = _rows(metrics), _rows(text_run["metrics"])
    assert [r["step"] for r in two] == [0, 1, 2, 3]
    for key in ("loss", "eval_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in two], [r.get(key, 0) for r in one], rtol=2e-5)
    sample = re.search(r"^sample: .*$", text_run["out"], re.M).group(0)
    assert f"[p0] {sample}" in out.split("\n"), out[-2000:]
    assert "[p1] sample" not in out
