"""Write the small trained models the test suite ships, as `.npz` files in `tests/data/`.

    python -m experiments.make_test_data [--out tests/data]

- `ar_gru3.npz`: the `ar_gru3` case (quick training, seed 0): `eqx.nn.GRUCell`
  weights (`weight_ih`, `weight_hh`, `bias`, `bias_n`), the decoder's `decoder_weight`
  `(2, 3)` and `decoder_bias` `(2,)`, and the evaluation noise `xs` `(2000, 1)`.
- `char_lstm_small.npz`: the `char_lstm_small` case (quick training, seed 0):
  `eqx.nn.LSTMCell` weights (`weight_ih`, `weight_hh`, `bias`), the embedding
  table `embedding` `(97, 8)` and 1000 held-out character ids `tokens` (uint8).

All float32. `tests/trained.py` rebuilds the cells from these arrays alone.
"""

import argparse
from pathlib import Path

import numpy as np

from ._trained import load_case


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tests") / "data")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    _, xs, _, meta = load_case("ar_gru3", T=2000, quick=True, seed=0)
    m = meta["model"]
    np.savez_compressed(
        args.out / "ar_gru3.npz",
        weight_ih=np.asarray(m.cell.weight_ih),
        weight_hh=np.asarray(m.cell.weight_hh),
        bias=np.asarray(m.cell.bias),
        bias_n=np.asarray(m.cell.bias_n),
        decoder_weight=np.asarray(m.decoder.weight),
        decoder_bias=np.asarray(m.decoder.bias),
        xs=np.asarray(xs, np.float32),
    )

    _, _, _, meta = load_case("char_lstm_small", T=1000, quick=True, seed=0)
    m = meta["model"]
    np.savez_compressed(
        args.out / "char_lstm_small.npz",
        weight_ih=np.asarray(m.cell.weight_ih),
        weight_hh=np.asarray(m.cell.weight_hh),
        bias=np.asarray(m.cell.bias),
        embedding=np.asarray(m.embed.weight),
        tokens=np.asarray(meta["tokens"][:-1], np.uint8),
    )
    for f in sorted(args.out.glob("*.npz")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
