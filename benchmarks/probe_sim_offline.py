#!/usr/bin/env python
"""Can a fresh SIM multimodal encoder + matching head learn to tell pairs from non-pairs on a
corpus, given a trained model's speech sequences and image tokens? (A diagnostic for the C2F
ablation, where SIM stayed at its prior during joint training.)

    python benchmarks/probe_sim_offline.py CHECKPOINT --data MANIFEST_DIR [--layers 2 --lr 1e-3 --steps 600]

Encodes the train and valid splits once with the checkpoint (eval_recall's code path, speech-layer
sequences kept), then trains a new MultimodalEncoder + MatchingHead with Adam on batches of
balanced pairs: the utterance's own image, or a uniformly drawn other image (random, not hard,
negatives). Every 100 steps prints the training loss and the accuracy on 256 fresh balanced valid
pairs (chance 50 %). The checkpoint's own SIM parts are not used.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmd_plugin.loading import load_cmd_checkpoint  # noqa: E402
from cmd_plugin.modules.multimodal import MatchingHead, MultimodalEncoder  # noqa: E402
from cmd_plugin.retrieval.evaluate import encode_split  # noqa: E402


def balanced_pairs(emb, n, dim, gen):
    """n (speech sequence, image tokens) pairs of a split, half of them matching -> padded speech
    (n, L, D), padding mask (n, L), image tokens (n, 1+N, E), labels (n,) 1 = match."""
    utt = torch.randint(len(emb.speech_sequences), (n,), generator=gen)
    own = emb.image_ids[utt]
    match = torch.rand(n, generator=gen) < 0.5
    other = (own + torch.randint(1, emb.images.shape[0], (n,), generator=gen)) % emb.images.shape[0]
    images = torch.where(match, own, other)
    seqs = [emb.speech_sequences[i].float() for i in utt]
    longest = max(s.shape[0] for s in seqs)
    speech = torch.zeros(n, longest, dim)
    mask = torch.ones(n, longest, dtype=torch.bool)
    for j, s in enumerate(seqs):
        speech[j, : s.shape[0]] = s
        mask[j, : s.shape[0]] = False
    return speech, mask, emb.image_tokens[images].float(), match.long()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, help="manifest directory (train and valid splits)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, task = load_cmd_checkpoint(args.checkpoint, data=args.data)
    start = time.time()
    train = encode_split(model, task, "train", progress=False, keep_sequences=True)
    valid = encode_split(model, task, "valid", progress=False, keep_sequences=True)
    print(f"encoded train and valid in {time.time() - start:.0f}s", flush=True)
    dim, image_dim = train.speech_sequences[0].shape[1], train.image_tokens.shape[2]
    encoder = MultimodalEncoder(dim, image_dim, layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim, dropout=0.0)
    head = MatchingHead(dim)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=args.lr)
    gen_train, gen_valid = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        speech, mask, tokens, labels = balanced_pairs(train, args.batch_size, dim, gen_train)
        loss = F.cross_entropy(head(encoder.fused_cls(speech, mask, tokens)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                speech, mask, tokens, labels = balanced_pairs(valid, 256, dim, gen_valid)
                accuracy = (head(encoder.fused_cls(speech, mask, tokens)).argmax(1) == labels).float().mean()
            print(
                f"step {step}: train loss {loss.item():.3f}, valid accuracy on balanced pairs {100 * accuracy:.1f} %",
                flush=True,
            )


if __name__ == "__main__":
    main()
