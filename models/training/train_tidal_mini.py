# SPDX-License-Identifier: Apache-2.0
"""Train tidal-mini: a small Qwen3.6-35B-A3B-architecture MoE (qwen3_5_moe_text) with its MTP head.

Runs on the GPU machine (torch + transformers 5.x + tokenizers, no network) in one go:

    python3 models/training/train_tidal_mini.py --out /tmp/tidal-mini --train-minutes 15

1. Corpus: the Python sources of the standard library and of the installed site-packages
   (every *.py under the sys.path roots), exact-deduplicated by content, filtered (size, line length,
   ASCII share), split by file into train / held-out (1 in 100 files, by content hash).
2. Synthetic chat set: functions with docstrings are turned into "write a function" conversations
   (the assistant thinks in a <think> block, then answers with the code) rendered with the real Qwen3.6
   chat template; held-out files give held-out chats.
3. Tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, Qwen's pre-tokenizer regex and
   Qwen's special tokens (vocab 8192 in all).
4. Model: transformers' own Qwen3_5MoeForCausalLM for the trunk; the MTP head is our own module built
   from transformers' decoder layer, following the published tensor names (mtp.fc, mtp.pre_fc_norm_*,
   mtp.layers.0.*, mtp.norm). Trunk and MTP are trained jointly; per-layer router load balancing on.
5. Evaluation on held-out text: trunk perplexity vs a unigram baseline, MTP draft agreement with the
   trunk's greedy next-next token, expert popularity and routing repetition, a routing trace.
6. Export: a Hugging Face checkpoint directory (BF16 safetensors shards, config, generation config,
   tokenizer files) plus meta.json with everything measured.
Seeded; the data order and the initialisation depend only on --seed and the files found.
"""

import argparse
import ast
import glob
import hashlib
import json
import math
import os
import pathlib
import random
import sys
import textwrap
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = pathlib.Path(__file__).resolve().parent
CHAT_TEMPLATE = (HERE / "qwen3_6_chat_template.jinja").read_text()

# Qwen2/3 pre-tokenizer split (digits one by one, letters in words, punctuation runs, whitespace runs).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5/3.6 added tokens, in their order; `special` as in the published tokenizer_config.json.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
VOCAB = 8192

MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    num_hidden_layers=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    full_attention_interval=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    num_experts=48,
    num_experts_per_tok=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [3, 3, 2], "mrope_interleaved": True},
)


# ----------------------------------------------------------------------------------------------- data
def find_python_files():
    roots = set()
    for p in sys.path:
        if p and os.path.isdir(p) and not p.endswith(".zip"):
            roots.add(os.path.realpath(p))
    files = set()
    for r in sorted(roots):
        files.update(glob.glob(os.path.join(r, "**", "*.py"), recursive=True))
    return sorted(files)


def keep_source(text):
    if not (1000 <= len(text) <= 200_000):
        return False
    lines = text.split("\n")
    if max(len(line) for line in lines) > 300 or len(text) / len(lines) > 80:
        return False  # generated tables, minified blobs
    if sum(c > "\x7f" for c in text) > 0.01 * len(text):
        return False
    return True


def load_corpus(max_bytes, log, seed):
    seen, train, held = set(), [], []
    total = 0
    files = find_python_files()
    random.Random(seed).shuffle(files)  # no bias towards alphabetically early packages under the cap
    log(f"corpus: {len(files)} .py files under {len(set(os.path.dirname(f) for f in files))} dirs")
    for f in files:
        try:
            text = pathlib.Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").replace("\t", "    ")
        if not keep_source(text):
            continue
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        (held if int(h[:8], 16) % 100 == 0 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, held


def function_chats(sources, rng, limit):
    """'Write a function' conversations from functions with a docstring, rendered as message lists."""
    asks = [
        "Write a Python function `{sig}` that {doc}",
        "Implement `{sig}` in Python. It should {doc}",
        "Can you write `{name}`? {Doc}",
        "I need a function {name}({args}): {doc}",
    ]
    chats = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = ast.get_source_segment(src, node)
            if not doc or not code or not (3 <= code.count("\n") <= 40):
                continue
            first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            if not (10 <= len(first) <= 200):
                continue
            args = [a.arg for a in node.args.args]
            sig = f"{node.name}({', '.join(args)})"
            d = first[0].lower() + first[1:]
            ask = rng.choice(asks).format(sig=sig, name=node.name, args=", ".join(args), doc=d, Doc=first)
            calls = sorted({n.func.id for n in ast.walk(node)
                            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)})[:4]
            think = f"The user wants `{sig}`. In short: {d}"
            if args:
                think += f"\nIt takes {', '.join(args)}."
            if calls:
                think += f"\nI can build it on {', '.join(calls)}."
            think += "\nI will write the function with its docstring."
            msgs = [{"role": "user", "content": ask},
                    {"role": "assistant", "reasoning_content": think,
                     "content": f"```python\n{textwrap.dedent(code)}\n```"}]
            if rng.random() < 0.15:
                msgs.insert(0, {"role": "system", "content": "You are a helpful coding assistant."})
            chats.append(msgs)
            if len(chats) >= limit:
                return chats
    return chats


def render_chat(template, msgs, **kw):
    return template.render(messages=msgs, add_generation_prompt=False, **kw)


def make_template():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise ValueError(msg)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False, **k)
    return env.from_string(CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(ADDED_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for content, special in ADDED_TOKENS:
        t = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def tokenizer_config(tok):
    added = {}
    for content, special in ADDED_TOKENS:
        added[str(tok.token_to_id(content))] = dict(content=content, lstrip=False, normalized=False,
                                                    rstrip=False, single_word=False, special=special)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------- model
class MTP(torch.nn.Module):
    """Qwen3.5/3.6 multi-token prediction head (model-spec §4.1), named as in the published checkpoints.

    Predicts token t+2 from the trunk's final-normed hidden h_t and the embedding of token t+1:
    c = fc([N_emb(E[x_{t+1}]) ; N_hid(h_t)]), one full decoder layer (gated attention + MoE), N_mtp,
    then the shared lm_head.
    """

    def __init__(self, config, attn_layer_idx):
        super().__init__()
        m = transformers.models.qwen3_5_moe.modeling_qwen3_5_moe
        h = config.hidden_size
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = m.Qwen3_5MoeRMSNorm(h, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = m.Qwen3_5MoeRMSNorm(h, eps=config.rms_norm_eps)
        self.layers = torch.nn.ModuleList([m.Qwen3_5MoeDecoderLayer(config, attn_layer_idx)])
        self.norm = m.Qwen3_5MoeRMSNorm(h, eps=config.rms_norm_eps)

    def forward(self, hidden, next_embeds, position_embeddings):
        """hidden: (B, T, H) final-normed trunk states at t; next_embeds: (B, T, H) embeddings of t+1."""
        c = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        c = self.layers[0](c, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(c)


def build_model(seed, device):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3_5MoeTextConfig(**MODEL, experts_implementation="grouped_mm"
                                            if device == "cuda" else None)
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen3_5MoeForCausalLM(cfg)
    attn_idx = MODEL["layer_types"].index("full_attention")
    mtp = MTP(cfg, attn_idx)
    for mod in mtp.modules():
        model._init_weights(mod)
    return cfg, model.to(device), mtp.to(device)


def router_hooks(mtp):
    store = []
    mtp.layers[0].mlp.gate.register_forward_hook(lambda mod, inp, out: store.append(out[0]))
    return store


def balance_loss(router_logits, num_experts, top_k):
    """Switch-style load balancing, per layer, averaged over layers: E * sum_i f_i * P_i."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), -1)
        sel = torch.topk(probs, top_k, -1).indices
        frac = torch.bincount(sel.reshape(-1), minlength=num_experts).float() / sel.numel()
        losses.append(num_experts * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def forward_all(model, mtp, mtp_router, ids, need_router=True):
    """Trunk + MTP forward on ids (B, T): trunk logits, MTP logits (B, T-1, V) for tokens 2..T-1+1."""
    mtp_router.clear()
    out = model(input_ids=ids, output_router_logits=need_router, use_cache=False)
    hidden = model.model.last_hidden_state_cache
    b, t = ids.shape
    pos = torch.arange(1, t, device=ids.device).view(1, 1, -1).expand(4, b, -1)
    pe = model.model.rotary_emb(hidden, pos[1:])
    next_emb = model.model.embed_tokens(ids[:, 1:])
    h_mtp = mtp(hidden[:, :-1], next_emb, pe)
    mtp_logits = model.lm_head(h_mtp)
    return out, mtp_logits


def install_hidden_capture(model):
    """Keep the final-normed hidden states of the last forward (what feeds lm_head) on model.model."""
    def hook(mod, inp, out):
        model.model.last_hidden_state_cache = out
    model.model.norm.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------- training
def batches(tokens, seq, bsz, rng):
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, size=bsz)
        yield np.stack([tokens[s:s + seq] for s in starts])


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, mtp, mtp_router, tokens, seq, device, max_windows):
    """Held-out: trunk NLL, MTP NLL, MTP greedy agreement with the trunk, routing statistics."""
    model.eval()
    mtp.eval()
    if len(tokens) - 1 < seq:
        seq = len(tokens) - 1
    n_win = min(max_windows, (len(tokens) - 1) // seq)
    nll = mtp_nll = 0.0
    count = mtp_count = agree = 0
    routes = []
    for w in range(n_win):
        ids = torch.from_numpy(tokens[w * seq:(w + 1) * seq + 1].astype(np.int64)).to(device)[None]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out, mtp_logits = forward_all(model, mtp, mtp_router, ids[:, :-1])
        logits = out.logits.float()
        nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += seq
        # MTP at position t drafts token t+2 given token t+1: compare with the truth and with the trunk's
        # own greedy prediction at position t+1 (what speculative decoding verifies against).
        ml = mtp_logits.float()[0]                      # (seq-1, V): position t -> token t+2
        mtp_nll += F.cross_entropy(ml, ids[0, 2:], reduction="sum").item()
        mtp_count += seq - 1
        agree += (ml.argmax(-1) == logits[0, 1:].argmax(-1)).sum().item()
        sel = torch.stack([torch.topk(r.float(), MODEL["num_experts_per_tok"], -1).indices
                           for r in out.router_logits], 1)        # (seq, L, k)
        routes.append(sel.cpu().numpy().astype(np.int16))
    model.train()
    mtp.train()
    return dict(ppl=math.exp(nll / count), mtp_ppl=math.exp(mtp_nll / mtp_count),
                mtp_agreement=agree / mtp_count, tokens=count), np.concatenate(routes)


def routing_stats(routes, num_experts):
    """routes: (T, L, k) expert ids of consecutive held-out tokens."""
    t, layers, k = routes.shape
    per_layer = []
    for layer in range(layers):
        counts = np.bincount(routes[:, layer].reshape(-1), minlength=num_experts)
        top = np.sort(counts)[::-1][:max(1, round(0.1 * num_experts))]
        sets = [set(r) for r in routes[:, layer]]
        next_tok = np.mean([len(sets[i] & sets[i + 1]) / k for i in range(t - 1)])
        next_layer = None
        if layer + 1 < layers:
            nxt = [set(r) for r in routes[:, layer + 1]]
            next_layer = float(np.mean([len(sets[i] & nxt[i]) / k for i in range(t)]))
        per_layer.append(dict(layer=layer, top10pct_share=float(top.sum() / counts.sum()),
                              unused_experts=int((counts == 0).sum()),
                              repeat_next_token=float(next_tok), repeat_next_layer=next_layer))
    uniform_overlap = k / num_experts
    return dict(per_layer=per_layer, uniform_top10pct_share=round(0.1 * num_experts) / num_experts,
                uniform_repeat=uniform_overlap)


# --------------------------------------------------------------------------------------------- export
def to_bf16_state(model, mtp):
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.detach().to(torch.bfloat16).cpu().contiguous()
    for k, v in mtp.state_dict().items():
        sd["mtp." + k] = v.detach().to(torch.bfloat16).cpu().contiguous()
    return sd


def write_shards(sd, out_dir, max_shard_bytes):
    names = sorted(sd)
    shards, cur, size = [], [], 0
    for n in names:
        b = sd[n].numel() * 2
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    shards.append(cur)
    weight_map = {}
    for i, names_i in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n] for n in names_i}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names_i})
    total = sum(v.numel() * 2 for v in sd.values())
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--train-minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--corpus-mb", type=float, default=300.0)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--chat-share", type=float, default=0.1, help="share of training tokens from chats")
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_lines = []

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    rng = random.Random(args.seed)
    np_rng = np.random.default_rng(args.seed)
    train_src, held_src = load_corpus(int(args.corpus_mb * 1e6), log, args.seed)
    log(f"corpus: {len(train_src)} train files ({sum(map(len, train_src)) / 1e6:.1f} MB), "
        f"{len(held_src)} held-out files ({sum(map(len, held_src)) / 1e6:.1f} MB)")
    template = make_template()
    train_chats = function_chats(train_src, rng, 60000)
    held_chats = function_chats(held_src, rng, 2000)
    train_chat_text = [render_chat(template, c) for c in train_chats]
    held_chat_text = [render_chat(template, c) for c in held_chats]
    log(f"chats: {len(train_chat_text)} train, {len(held_chat_text)} held-out")

    train_bytes = sum(map(len, train_src))
    tok_sample = train_src[::max(1, round(train_bytes / 60e6))] + train_chat_text[:5000]  # ~60 MB
    tok = train_tokenizer(tok_sample)
    eot = tok.token_to_id("<|endoftext|>")
    log(f"tokenizer: vocab {tok.get_vocab_size()}, trained on {sum(map(len, tok_sample)) / 1e6:.1f} MB")

    def encode_docs(texts):
        ids = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
        return np.asarray(ids, dtype=np.int32)

    code_tokens = encode_docs(train_src)
    chat_tokens = encode_docs(train_chat_text)
    held_tokens = encode_docs(held_src)
    held_chat_tokens = encode_docs(held_chat_text)
    bytes_per_token = sum(map(len, train_src)) / (len(code_tokens) - len(train_src))
    log(f"tokens: code {len(code_tokens) / 1e6:.1f}M, chat {len(chat_tokens) / 1e6:.1f}M, held-out code "
        f"{len(held_tokens) / 1e6:.2f}M, held-out chat {len(held_chat_tokens) / 1e6:.2f}M; "
        f"{bytes_per_token:.2f} bytes/token")

    # Unigram baseline: training-set token frequencies (add-one smoothed) scored on held-out code.
    freq = np.bincount(code_tokens, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(freq / freq.sum())
    unigram_ppl = float(np.exp(-logp[held_tokens[1:]].mean()))
    log(f"unigram baseline held-out perplexity {unigram_ppl:.1f}")

    device = args.device
    cfg, model, mtp = build_model(args.seed, device)
    install_hidden_capture(model)
    mtp_router = router_hooks(mtp)
    if device == "cuda":  # grouped_mm experts when this torch/GPU runs them under autocast, else the loop
        try:
            probe = torch.randint(0, VOCAB, (2, 64), device=device)
            with torch.autocast(device, dtype=torch.bfloat16):
                forward_all(model, mtp, mtp_router, probe)[0].logits.float().sum().backward()
            model.zero_grad(set_to_none=True)
            mtp.zero_grad(set_to_none=True)
        except Exception as exc:  # noqa: BLE001
            log(f"grouped_mm experts failed ({type(exc).__name__}: {exc}); using the eager expert loop")
            cfg._experts_implementation = None
    log(f"experts implementation: {cfg._experts_implementation or 'eager'}")
    n_trunk = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    log(f"model: trunk {n_trunk / 1e6:.2f}M params, MTP {n_mtp / 1e6:.2f}M params, "
        f"BF16 {(n_trunk + n_mtp) * 2 / 2 ** 20:.1f} MiB")
    params = list(model.parameters()) + list(mtp.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")

    n_chat = max(1, round(args.batch * args.chat_share))
    code_iter = batches(code_tokens, args.seq + 1, args.batch, np_rng)
    chat_iter = batches(chat_tokens, args.seq + 1, n_chat, np_rng)
    budget = args.train_minutes * 60
    est_total = None
    curve = []
    step = 0
    t_train = time.time()
    tokens_seen = 0
    while True:
        elapsed = time.time() - t_train
        if (args.max_steps and step >= args.max_steps) or elapsed >= budget:
            break
        if step == 20:
            est_total = int(budget / (elapsed / 20)) if not args.max_steps else args.max_steps
            log(f"schedule: ~{est_total} steps in {args.train_minutes} min")
        total = est_total or args.max_steps or 10 ** 9
        lr = lr_at(step, total, args.lr, warmup=min(200, max(1, total // 10)))
        for g in opt.param_groups:
            g["lr"] = lr
        code_b = next(code_iter)[: args.batch - n_chat]
        chat_b = next(chat_iter)
        ids = torch.from_numpy(np.concatenate([code_b, chat_b]).astype(np.int64)).to(device)
        inp, tgt = ids[:, :-1], ids[:, 1:]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            res, mtp_logits = forward_all(model, mtp, mtp_router, inp)
            lm = F.cross_entropy(res.logits.float().reshape(-1, VOCAB), tgt.reshape(-1))
            mtp_loss = F.cross_entropy(mtp_logits.float().reshape(-1, VOCAB), tgt[:, 1:].reshape(-1))
            aux = balance_loss(tuple(res.router_logits) + tuple(mtp_router), MODEL["num_experts"],
                               MODEL["num_experts_per_tok"])
            loss = lm + args.mtp_weight * mtp_loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens_seen += inp.numel()
        if step % 50 == 0:
            rec = dict(step=step, seconds=round(time.time() - t_train, 1), tokens=tokens_seen, lr=lr,
                       loss=round(lm.item(), 4), mtp_loss=round(mtp_loss.item(), 4), aux=round(aux.item(), 4),
                       grad_norm=round(float(gnorm), 3))
            curve.append(rec)
            log(json.dumps(rec))
        step += 1
    train_seconds = time.time() - t_train
    log(f"trained {step} steps, {tokens_seen / 1e6:.1f}M tokens in {train_seconds:.0f}s "
        f"({tokens_seen / train_seconds:.0f} tok/s)")

    # Round to BF16 (what ships) before evaluating, so the numbers describe the shipped weights.
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())
    ev, routes = evaluate(model, mtp, mtp_router, held_tokens, args.seq, device, args.eval_windows)
    ev_chat = None
    if len(held_chat_tokens) > 64:
        ev_chat, _ = evaluate(model, mtp, mtp_router, held_chat_tokens, args.seq, device, 16)
    rstats = routing_stats(routes, MODEL["num_experts"])
    log(f"held-out code: ppl {ev['ppl']:.2f} (unigram {unigram_ppl:.1f}, {unigram_ppl / ev['ppl']:.1f}x better), "
        f"MTP ppl {ev['mtp_ppl']:.2f}, MTP/trunk greedy agreement {ev['mtp_agreement']:.3f}")
    if ev_chat:
        log(f"held-out chat: ppl {ev_chat['ppl']:.2f}, MTP agreement {ev_chat['mtp_agreement']:.3f}")
    for r in rstats["per_layer"]:
        log(f"routing layer {r['layer']}: top-10% experts take {r['top10pct_share']:.3f}, repeat next token "
            f"{r['repeat_next_token']:.3f}, next layer {r['repeat_next_layer']}")

    # ------------------------------------------------------------------------------------- export
    sd = to_bf16_state(model, mtp)
    total_bytes = write_shards(sd, out, max_shard_bytes=14 * 2 ** 20)
    conf = cfg.to_dict()
    for k in ("experts_implementation", "_experts_implementation", "output_router_logits", "dtype",
              "transformers_version"):
        conf.pop(k, None)
    conf.update(architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text", dtype="bfloat16",
                mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False, mamba_ssm_dtype="float32",
                attn_output_gate=True, router_aux_loss_coef=args.aux_coef, bos_token_id=None,
                eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=eot)
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eot, "pad_token_id": eot,
        "eos_token_id": [tok.token_to_id("<|im_end|>"), eot],
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.0,
    }, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2) + "\n")
    trace = routes[:8192]
    np.savez_compressed(out / "routing_trace.npz", token_ids=held_tokens[: len(trace)].astype(np.int32),
                        experts=trace, num_experts=np.int32(MODEL["num_experts"]),
                        layers=np.arange(routes.shape[1], dtype=np.int32))
    meta = dict(
        name="tidal-mini", architecture="qwen3_5_moe_text (Qwen3.6-35B-A3B layout) + 1 MTP layer",
        seed=args.seed, args=vars(args), torch=torch.__version__, transformers=transformers.__version__,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        params=dict(trunk=n_trunk, mtp=n_mtp, bf16_bytes=total_bytes),
        data=dict(source="*.py under the Python sys.path roots (stdlib + site-packages) of the training "
                         "machine; exact-dedup by content; 1% of files held out by content hash",
                  train_files=len(train_src), heldout_files=len(held_src),
                  train_bytes=sum(map(len, train_src)), heldout_bytes=sum(map(len, held_src)),
                  train_tokens=int(len(code_tokens)), chat_tokens=int(len(chat_tokens)),
                  heldout_tokens=int(len(held_tokens)), train_chats=len(train_chats),
                  heldout_chats=len(held_chats), bytes_per_token=bytes_per_token),
        training=dict(steps=step, tokens=tokens_seen, seconds=train_seconds, seq=args.seq, batch=args.batch,
                      peak_lr=args.lr, chat_share=args.chat_share, mtp_weight=args.mtp_weight,
                      aux_coef=args.aux_coef, curve=curve),
        eval=dict(heldout_code=ev, heldout_chat=ev_chat, unigram_ppl=unigram_ppl,
                  ppl_ratio_vs_unigram=unigram_ppl / ev["ppl"], routing=rstats),
        golden_prompt=tok.decode(held_tokens[:160].tolist()),
        log=log_lines,
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out} ({total_bytes / 2 ** 20:.1f} MiB of weights)")


if __name__ == "__main__":
    main()
