"""Train the built-in GPT on your own text: a tokenizer, a config file, held-out eval, a sample.

What a user does with their own corpus, end to end, on files this script writes first (any
text works: point ``data`` at your ``*.txt`` files):

1. a BPE tokenizer trained with Hugging Face ``tokenizers`` (``tokenizer.json``);
2. a ``run.toml`` holding the flags (``meshpar train --config run.toml``);
3. ``meshpar train``: Grain reads the files, 10% of the windows are held out and evaluated every
   few steps, TensorBoard event files are written, checkpoints land in ``ckpt/``;
4. ``meshpar sample`` continues a prompt from the checkpoint, on another mesh.

Run it::

    python examples/own_data.py --steps 200 --dir /tmp/own_data
    tensorboard --logdir /tmp/own_data/tb
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

import meshpar as mp

if __name__ == "__main__":
    mp.emulate_devices(8)  # 8 CPU devices; must happen before JAX starts its backend

from pydoc_data.topics import topics  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from meshpar.cli import main as meshpar  # noqa: E402


def write_corpus(directory: str) -> list[str]:
    """Two text files of Python's reference documentation (your own files go here)."""
    texts = [topics[key] for key in sorted(topics)]
    paths = []
    for i, part in enumerate((texts[: len(texts) // 2], texts[len(texts) // 2:])):
        path = os.path.join(directory, f"part{i}.txt")
        with open(path, "w") as f:
            f.write("\n\n".join(part))
        paths.append(path)
    return paths


def train_tokenizer(paths: list[str], path: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (lossless on any UTF-8 text) trained on ``paths``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(paths, trainers.BpeTrainer(vocab_size=vocab_size,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the corpus, tokenizer and config, train, sample; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dir", help="where to write everything (default: a temporary directory)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--sample-mesh", default="fsdp=4,tensor=2",
                   help="the mesh meshpar sample runs on (any mesh; training uses data=4,tensor=2)")
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="meshpar_own_data_")
    os.makedirs(root, exist_ok=True)
    paths = write_corpus(root)
    train_tokenizer(paths, os.path.join(root, "tokenizer.json"), args.vocab_size)
    config = os.path.join(root, "run.toml")
    with open(config, "w") as f:
        f.write(f"""# meshpar train --config run.toml (flags on the command line override these)
preset = "tiny"
seq-len = 64
batch-size = 16
mesh = "data=4,tensor=2"
data = "{root}/part*.txt"
tokenizer = "{root}/tokenizer.json"
vocab-size = {args.vocab_size}
eval-fraction = 0.1
eval-every = 50
eval-batches = 2
lr-schedule = "cosine"
warmup-steps = 1
sample-tokens = 16
tensorboard = "{root}/tb"
metrics-file = "{root}/metrics.jsonl"
checkpoint-dir = "{root}/ckpt"
""")
    status = meshpar(["train", "--config", config, "--steps", str(args.steps)])
    if status:
        return status
    print(f"effective configuration: {root}/ckpt/config.toml")
    return meshpar(["sample", "--checkpoint-dir", f"{root}/ckpt", "--prompt", "The assert",
                    "--max-tokens", "16", "--mesh", args.sample_mesh])


if __name__ == "__main__":
    sys.exit(main())
