# SPDX-License-Identifier: Apache-2.0
"""MTP draft acceptance on the model's own greedy continuations (what greedy speculative decoding sees).

    python3 models/training/eval_mtp.py models/tidal-mini [--prompts 32 --prompt-len 64 --new 64]

Prompts are windows of the held-out tokens stored in the checkpoint's routing_trace.npz. For each prompt
the trunk (transformers' Qwen3_5MoeForCausalLM loaded from the checkpoint) continues greedily; the MTP
head (loaded from the checkpoint's mtp.* tensors into the training script's module) then drafts token
t+2 from the trunk's final-normed hidden at t and token t+1, at every generated position; a draft is
accepted when it equals the trunk's greedy token t+2. Prints JSON.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_tidal_mini import MTP  # noqa: E402


def load(ckpt):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = model.config
    mtp = MTP(cfg, cfg.layer_types.index("full_attention")).eval()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update({k[len("mtp."):]: v.float() for k, v in load_file(str(ckpt / shard)).items()
                   if k.startswith("mtp.")})
    mtp.load_state_dict(sd, strict=True)
    return model, mtp


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    ckpt = pathlib.Path(args.checkpoint)
    model, mtp = load(ckpt)
    hidden = {}
    model.model.norm.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    tokens = np.load(ckpt / "routing_trace.npz")["token_ids"].astype(np.int64)
    stride = (len(tokens) - args.prompt_len) // args.prompts
    accepted = total = 0
    for p in range(args.prompts):
        prompt = torch.from_numpy(tokens[p * stride:p * stride + args.prompt_len])[None]
        seq = model.generate(prompt, max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        model(input_ids=seq, use_cache=False)            # teacher-forced on the greedy sequence
        h = hidden["h"]
        b, t = seq.shape
        pos = torch.arange(1, t).view(1, 1, -1).expand(4, b, -1)
        pe = model.model.rotary_emb(h, pos[1:])
        drafts = model.lm_head(mtp(h[:, :-1], model.model.embed_tokens(seq[:, 1:]), pe)).argmax(-1)[0]
        # drafts[t] predicts seq[t+2]; score the positions whose t+2 is a generated token
        lo = args.prompt_len - 2
        accepted += (drafts[lo:t - 2] == seq[0, lo + 2:]).sum().item()
        total += t - 2 - lo
    print(json.dumps({"checkpoint": ckpt.name, "prompts": args.prompts, "prompt_len": args.prompt_len,
                      "new_tokens": args.new, "drafts": total, "accepted": accepted,
                      "acceptance": accepted / total, "torch": torch.__version__,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
