"""bf16 against fp32 dots on XLA:CPU, one op at a time: which forms reach the fast bf16 kernels.

For the per-device dot shapes of a GPT train step (``fsdp=8``, 4 layers, d 256, MLP 1024,
vocabulary 32000, one row of 128 tokens per device; plus one 20m-preset MLP matmul), each
``lax.dot_general`` is compiled three ways and timed in interleaved repeats in one process (ratios
robust to the load of a shared machine):

* ``f32``: fp32 operands and result (the reference);
* ``bf16->bf16``: bf16 operands and result (what ``jnp.einsum`` of bf16 arrays gives);
* ``bf16->f32``: bf16 operands, fp32 result (``preferred_element_type=jnp.float32``).

The bracket after each form says what the compiled program holds: the dtype of the ``dot``'s
result and ``cvt`` when the program converts (XLA upcast the operands to fp32). Results and their
reading: benchmarks/README.md, "bf16 on XLA:CPU". Run it with any interpreter that has JAX, e.g.
meshpar's (jax 0.10.2) and MaxText's venv (jax 0.12) for the comparison there.

Usage:
    python benchmarks/bf16_dots.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

CASES = [
    ("qkv fwd   128x256 @ 256x768", (128, 256), (256, 768), (((1,), (0,)), ((), ()))),
    ("mlp in    128x256 @ 256x1024", (128, 256), (256, 1024), (((1,), (0,)), ((), ()))),
    ("mlp out   128x1024 @ 1024x256", (128, 1024), (1024, 256), (((1,), (0,)), ((), ()))),
    ("dX  128x1024 . 256x1024^T", (128, 1024), (256, 1024), (((1,), (1,)), ((), ()))),
    ("dW  128x256^T . 128x1024", (128, 256), (128, 1024), (((0,), (0,)), ((), ()))),
    ("scores 4x128x64 . 4x128x64", (4, 128, 64), (4, 128, 64), (((2,), (2,)), ((0,), (0,)))),
    ("pv   4x128x128 . 4x128x64", (4, 128, 128), (4, 128, 64), (((2,), (1,)), ((0,), (0,)))),
    ("logits 128x256 . 32000x256^T", (128, 256), (32000, 256), (((1,), (1,)), ((), ()))),
    ("dEmb 128x32000^T . 128x256", (128, 32000), (128, 256), (((0,), (0,)), ((), ()))),
    ("20m mlp 2048x512 @ 512x2048", (2048, 512), (512, 2048), (((1,), (0,)), ((), ()))),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax import lax

    def form(compiled) -> str:
        text = compiled.as_text()
        dts = sorted(set(re.findall(r"= ([a-z0-9]+)\[[0-9,]*\]\S* dot\(", text)))
        return ",".join(dts) + ("|cvt" if "convert" in text else "")

    print(f"jax {jax.__version__}; median of {args.repeats} interleaved repeats, "
          f"{args.inner} calls each; time relative to the fp32 dot")
    for name, ls, rs, dn in CASES:
        a = jax.random.normal(jax.random.key(0), ls)
        b = jax.random.normal(jax.random.key(1), rs)
        runs = {}
        for label, dt, pref in (("f32", jnp.float32, None), ("bf16->bf16", jnp.bfloat16, None),
                                ("bf16->f32", jnp.bfloat16, jnp.float32)):
            ops = (a.astype(dt), b.astype(dt))
            fn = jax.jit(lambda x, y, pref=pref: lax.dot_general(x, y, dn,
                                                                 preferred_element_type=pref))
            runs[label] = (fn.lower(*ops).compile(), ops)
        times = {k: [] for k in runs}
        order = list(runs)
        for r in range(args.repeats):
            for k in (order if r % 2 == 0 else order[::-1]):
                c, ops = runs[k]
                t = time.perf_counter()
                for _ in range(args.inner):
                    out = c(*ops)
                jax.block_until_ready(out)
                times[k].append((time.perf_counter() - t) / args.inner)
        base = statistics.median(times["f32"])
        cols = "  ".join(f"{k} [{form(runs[k][0])}] {statistics.median(times[k]) / base:.2f}"
                         for k in runs)
        print(f"{name:32s} f32 {base * 1e3:7.3f} ms | {cols}")


if __name__ == "__main__":
    main()
