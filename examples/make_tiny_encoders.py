#!/usr/bin/env python
"""Write tiny random HuBERT and open_clip encoders in the released formats (tests, CPU demo).

    python examples/make_tiny_encoders.py --out-dir /tmp/tiny [--seed 0]

writes DIR/tiny_hubert.pt (fairseq HuBERT checkpoint, task normalize=True) and
DIR/tiny_clip/{<model name>.json, open_clip_pytorch_model.bin}.
"""

import argparse
import os

from cmd_demo.tiny_encoders import make_tiny_clip, make_tiny_hubert


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="directory to write the encoders to")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args(argv)

    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hubert_path = make_tiny_hubert(os.path.join(out_dir, "tiny_hubert.pt"), seed=args.seed)
    model_name, config_path, weights_path = make_tiny_clip(os.path.join(out_dir, "tiny_clip"), seed=args.seed)
    print(f"hubert_checkpoint={hubert_path}")
    print(f"clip_model_name={model_name}")
    print(f"clip_model_config={config_path}")
    print(f"clip_pretrained={weights_path}")


if __name__ == "__main__":
    main()
