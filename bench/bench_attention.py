"""Packed attention on a GPU: one SDPA call per packed segment (Unsloth's path on torch 2.11 without flash-attn)
vs one call of torch's varlen flash kernel with GQA heads as they are (train.py's `training.varlen_attention`).

Checks that both give the same output and gradients (bf16 rounding apart), then times forward + backward.
Qwen3-4B attention shapes by default: 32 query heads, 8 K/V heads, head_dim 128.

    python bench/bench_attention.py                      # 60 segments of 20-400 tokens
    python bench/bench_attention.py --segments 200 --max-len 120
    python bench/bench_attention.py --tiny               # CPU smoke test: fp32, 6 segments of 4-40 tokens, 4/2 heads
                                                         # x 16; one SDPA call with a block-causal mask stands in
                                                         # for the varlen kernel (a CUDA-only kernel)
"""

import argparse
import time


def packed_inputs(torch, lengths, heads, kv_heads, head_dim, seed, device, dtype):
    torch.manual_seed(seed)
    total = sum(lengths)
    make = lambda h: torch.randn(total, h, head_dim, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device, dtype=torch.int32)
    return make(heads), make(kv_heads), make(kv_heads), cu


def per_segment_sdpa(torch, q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        seg = [x[start:start + n].transpose(0, 1)[None] for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def block_causal_sdpa(torch, q, k, v, lengths):
    """The whole pack in one SDPA call, each token seeing only the earlier tokens of its own segment: what the
    varlen kernel computes, on any device (the --tiny stand-in for it)."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)
    position = torch.arange(len(segment), device=q.device)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)),
                                                           attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def synchronize(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(torch, fn, q, k, v, grad_out, repeats):
    """(output, grads, ms per forward + backward)."""
    for x in (q, k, v):
        x.grad = None
    out = fn()
    (out.float() * grad_out).sum().backward()
    result = [out.detach().float()] + [x.grad.float() for x in (q, k, v)]
    synchronize(torch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        (fn().float() * grad_out).sum().backward()
    synchronize(torch)
    return result, (time.perf_counter() - t0) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=400)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test (see above; replaces the sizes)")
    a = parser.parse_args()
    if a.tiny:
        vars(a).update(segments=6, min_len=4, max_len=40, heads=4, kv_heads=2, head_dim=16, repeats=2)
    import torch
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (torch's varlen kernel is flash-attention); "
                         "use --tiny for the CPU smoke test")
    device, dtype = ("cpu", torch.float32) if a.tiny else ("cuda", torch.bfloat16)
    if not a.tiny:
        torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py (training.cudnn_attention=False)
    g = torch.Generator().manual_seed(a.seed)
    lengths = torch.randint(a.min_len, a.max_len, (a.segments,), generator=g).tolist()
    q, k, v, cu = packed_inputs(torch, lengths, a.heads, a.kv_heads, a.head_dim, a.seed, device, dtype)
    grad_out = torch.randn(q.shape, device=device, dtype=dtype)
    longest = max(lengths)
    if a.tiny:
        one_call, one_call_name = lambda: block_causal_sdpa(torch, q, k, v, lengths), "one SDPA call, block-causal mask"
    else:
        from torch.nn.attention.varlen import varlen_attn
        one_call = lambda: varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))  # noqa: E731
        one_call_name = "torch varlen flash"
    ref, t_ref = run(torch, lambda: per_segment_sdpa(torch, q, k, v, lengths), q, k, v, grad_out, a.repeats)
    var, t_var = run(torch, one_call, q, k, v, grad_out, a.repeats)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{a.segments} segments, {sum(lengths)} tokens, {a.heads}/{a.kv_heads} heads × {a.head_dim}, "
          f"{str(dtype).removeprefix('torch.')}; {where}, torch {torch.__version__}\n")
    print("| tensor | max abs difference | max abs value |\n|---|---|---|")
    for name, x, y in zip(("output", "dQ", "dK", "dV"), ref, var):
        print(f"| {name} | {(x - y).abs().max().item():.2e} | {x.abs().max().item():.2e} |")
    print(f"\n| path | calls per layer | ms per forward + backward |\n|---|---|---|\n"
          f"| SDPA per segment | {a.segments} | {t_ref:.2f} |\n| {one_call_name} | 1 | {t_var:.2f} |")


if __name__ == "__main__":
    main()
