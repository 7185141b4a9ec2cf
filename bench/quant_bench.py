"""Weight-only quantization on the CPU: matmul speed per batch size, accuracy per scheme, decode.

    PYTHONPATH=. python bench/quant_bench.py                 # everything, "medium" shape
    PYTHONPATH=. python bench/quant_bench.py --section matmul --batches 1 16
    PYTHONPATH=. python bench/quant_bench.py --section error
    PYTHONPATH=. python bench/quant_bench.py --section decode

shapes: each of those shapes alone: fp32 F.linear vs our int4 kernel, per CPU path (VNNI, AMX).
matmul: one transformer layer's four matmuls (qkv, dense, h_to_4h, 4h_to_h), cycling through
  --layers distinct copies so weights come from memory rather than cache, as in decode; min over
  --reps passes. Schemes: fp32 / bf16 F.linear, PyTorch's int4/int8 weight-only ops, ours.
error: the same random weights under each scheme (int8 per row, int4 per row = the seed,
  int4 group 128 / 32, and llama.cpp's q8_0 / q4_0 formats emulated on those weights): relative
  error of each linear's output on real hidden states, cosine of the final logits vs fp32, and
  greedy agreement with fp32 on a narrow model (wide random models are chaotic).
decode: the model's forward alone (no engine) for B concurrent decodes, tokens/s per precision,
  and the weight memory.
The machine is shared and noisy (2 vCPUs): compare figures of one run, not across runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from make_checkpoint import MEDIUM as SHAPES_MEDIUM  # bench/ is this script's sys.path[0]

from chatglm_serve.kernels import ops
from chatglm_serve.model.attention import AttentionMetadata
from chatglm_serve.model.chatglm import ChatGLMForCausalLM
from chatglm_serve.model.config import ChatGLMConfig
from chatglm_serve.model.quantize import QuantLinear, QuantSpec, quantize_model, quantize_weight

# the benchmarks' medium shape, with the real vocabulary (its output layer is what int4 saves most)
MEDIUM = dict(SHAPES_MEDIUM, padded_vocab_size=65024, torch_dtype="float32")
NARROW = dict(  # as narrow as the peers' token-exact comparisons (wider random models are chaotic)
    MEDIUM, num_layers=2, hidden_size=64, ffn_hidden_size=128, kv_channels=16, num_attention_heads=4
)

NARROW_STD = 0.05  # fp64 and fp32 agree on all 24 greedy tokens at this scale (0.1 does not)

SCHEMES = {  # name -> QuantSpec (None: full precision)
    "int8-row": QuantSpec(8),
    "int4-row (seed)": QuantSpec(4),
    "int4-g128": QuantSpec(4, 128),
    "int4-g32": QuantSpec(4, 32),
}


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------------- matmul
def layer_shapes(cfg: ChatGLMConfig) -> list[tuple[int, int]]:
    """(K, N) of one layer's four linears."""
    h = cfg.hidden_size
    return [
        (h, cfg.qkv_out_features),
        (h, h),
        (h, 2 * cfg.ffn_hidden_size),
        (cfg.ffn_hidden_size, h),
    ]


def bench_matmul(cfg: ChatGLMConfig, batches: list[int], layers: int, reps: int) -> None:
    shapes = layer_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    fp = [[torch.randn(n, k, generator=g) * 0.02 for k, n in shapes] for _ in range(layers)]
    params = sum(k * n for k, n in shapes)
    impls: dict[str, tuple[list, float]] = {}  # name -> (per-layer callables' state, bytes/param)
    impls["fp32 F.linear"] = (fp, 4.0)
    impls["bf16 F.linear"] = ([[w.bfloat16() for w in lw] for lw in fp], 2.0)
    aten4 = []
    for lw in fp:
        row = []
        for w in lw:
            q, s = quantize_weight(w, 4, 128)
            u = (q.to(torch.int32) + 8).contiguous()  # PyTorch's int4: (u - 8) * scale + zero
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
            sz = torch.stack([s.float().t(), torch.zeros_like(s.float().t())], -1).bfloat16()
            row.append((packed, sz.contiguous()))
        aten4.append(row)
    impls["aten int4pack g128 (bf16 x)"] = (aten4, 0.5)
    aten8 = []
    for lw in fp:
        row = []
        for w in lw:
            q, s = quantize_weight(w, 8)
            row.append((q, s.float()[:, 0].bfloat16()))
        aten8.append(row)
    impls["aten int8pack (bf16 x)"] = (aten8, 1.0)
    ours = {}
    for name, spec in SCHEMES.items():
        mods = []
        for lw in fp:
            row = []
            for w in lw:
                m = QuantLinear(
                    w.shape[1], w.shape[0], False, spec, from_checkpoint=False, name=name
                )
                m.load_weight("weight", w)
                m.finalize()
                row.append(m)
            mods.append(row)
        ours[name] = mods
    cpu = ", ".join(ops.cpu_impls()) or "unavailable"
    print(
        f"\n## matmul: one layer's 4 linears ({params / 1e6:.2f}M params), {layers} distinct layers, "
        f"{torch.get_num_threads()} threads, CPU kernel ISAs: {cpu}"
    )
    print("ms per layer (speedup vs fp32 F.linear) [weight GB/s]")
    for b in batches:
        xs = [torch.randn(b, k, generator=g) for k, _ in shapes]
        xb = [x.bfloat16() for x in xs]
        runs: dict[str, Callable[[], object]] = {
            "fp32 F.linear": lambda xs=xs: [F.linear(xs[i], lw[i]) for lw in fp for i in range(4)],
            "bf16 F.linear": lambda xb=xb: [
                F.linear(xb[i], lw[i]) for lw in impls["bf16 F.linear"][0] for i in range(4)
            ],
            "aten int4pack g128 (bf16 x)": lambda xb=xb: [
                torch.ops.aten._weight_int4pack_mm_for_cpu(xb[i], lw[i][0], 128, lw[i][1])
                for lw in aten4
                for i in range(4)
            ],
            "aten int8pack (bf16 x)": lambda xb=xb: [
                torch.ops.aten._weight_int8pack_mm(xb[i], lw[i][0], lw[i][1])
                for lw in aten8
                for i in range(4)
            ],
        }
        for name, mods in ours.items():
            runs[f"ours {name}"] = lambda mods=mods, xs=xs: [
                m(xs[i]) for lw in mods for i, m in enumerate(lw)
            ]
        times = {}
        for _ in range(2):  # interleave the schemes, keep each one's best
            for name, fn in runs.items():
                times[name] = min(times.get(name, float("inf")), _time(fn, reps) / layers)
        base = times["fp32 F.linear"]
        line = [f"B={b:<3}"]
        for name, t in times.items():
            bpp = impls[name][1] if name in impls else (1.0 if "int8" in name else 0.5)
            gbs = params * bpp / t / 1e9
            line.append(f"{name}: {t * 1e3:.3f} ({base / t:.1f}x) [{gbs:.0f}]")
        print(" | ".join(line), flush=True)


def bench_shapes(cfg: ChatGLMConfig, batches: list[int], layers: int, reps: int) -> None:
    """Per layer shape: fp32 F.linear against our int4 (g128) kernel on each CPU path."""
    impls = [i for i in ("avx512_vnni", "amx") if i in ops.cpu_impls()]
    print(
        f"\n## per shape (K -> N), int4 g128, {layers} copies, {torch.get_num_threads()} threads: "
        "ms per matmul [weight GB/s]; auto = the kernel's own choice"
    )
    g = torch.Generator().manual_seed(1)
    for k, n in layer_shapes(cfg):
        fp = [torch.randn(n, k, generator=g) * 0.02 for _ in range(layers)]
        q = []
        for w in fp:
            m = QuantLinear(k, n, False, QuantSpec(4, 128), from_checkpoint=False, name="bench")
            m.load_weight("weight", w)
            m.finalize()
            q.append(m)
        for b in batches:
            x = torch.randn(b, k, generator=g)
            row = {"fp32": _time(lambda x=x, fp=fp: [F.linear(x, w) for w in fp], reps) / layers}
            for impl in ["auto", *impls]:
                for m in q:
                    m.cpu_impl = impl
                row[impl] = _time(lambda x=x, q=q: [m(x) for m in q], reps) / layers
            cells = []
            for name, t in row.items():
                gbs = n * k * (4 if name == "fp32" else 0.5) / t / 1e9
                cells.append(f"{name} {t * 1e3:.3f} [{gbs:.0f}]")
            print(f"{k:>5} -> {n:<5} B={b:<3} " + " | ".join(cells), flush=True)


# ---------------------------------------------------------------------------- error
def emulate_ggml(w: torch.Tensor, kind: str) -> torch.Tensor:
    """llama.cpp's q8_0 / q4_0 on the same weights (format definitions: blocks of 32, one fp16
    scale each; q8_0 symmetric /127, q4_0 maps the signed extreme to -8, values 0..15 minus 8)."""
    wb = w.float().view(w.shape[0], -1, 32)
    if kind == "q8_0":
        d = (wb.abs().amax(-1, keepdim=True) / 127).half().float()
        q = torch.round(wb / torch.where(d > 0, d, torch.ones_like(d)))
        return (q * d).view_as(w)
    idx = wb.abs().argmax(-1, keepdim=True)
    mx = wb.gather(-1, idx)
    d = (mx / -8).half().float()
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(wb * inv + 8.5), max=15) - 8
    return (q * d).view_as(w)


def _capture_inputs(model: ChatGLMForCausalLM, ids: list[int]) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, a, name=name: inputs.__setitem__(name, a[0])
                )
            )
    run_prefill(model, ids)
    for h in hooks:
        h.remove()
    return inputs


def run_prefill(model: ChatGLMForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits of one prompt (a fresh KV cache)."""
    n = len(ids)
    blocks = -(-n // block_size)
    caches = [torch.zeros(model.kv_cache_shape(blocks, block_size)) for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=[0, n],
        seq_lens=[n],
        block_tables=torch.arange(blocks)[None],
        num_prefills=1,
        block_size=block_size,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))


def greedy(model: ChatGLMForCausalLM, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):  # re-prefill each step: simple, and the narrow model is tiny
        ids.append(int(run_prefill(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def _swap_weights(
    model: ChatGLMForCausalLM, fn: Callable[[torch.Tensor], torch.Tensor]
) -> ChatGLMForCausalLM:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fn(mod.weight))
    return model


@torch.inference_mode()
def bench_error(cfg: ChatGLMConfig, narrow: ChatGLMConfig, seed: int, tokens: int) -> None:
    print(
        f"\n## error per scheme (random weights std 0.02, seed {seed}; served = our kernel, "
        "which quantizes activations to int8 per 32 (int8) or up to 128 (int4) channels; "
        "weight-only = x @ dequant(W))"
    )
    ids = list(range(100, 100 + tokens))
    fp = ChatGLMForCausalLM.random(cfg, seed=seed)
    inputs = _capture_inputs(fp, ids)
    ref_logits = run_prefill(fp, ids)
    narrow_fp = ChatGLMForCausalLM.random(narrow, seed=seed, std=NARROW_STD)
    prompt = list(range(10, 30))
    ref_greedy = greedy(narrow_fp, prompt, 24)

    def report(name: str, layer_err: float, served_err: float | None, logits, greedy_ids) -> None:
        cos = F.cosine_similarity(logits.double(), ref_logits.double(), dim=-1)
        agree = "n/a"
        if greedy_ids is not None:
            same = [a == b for a, b in zip(greedy_ids, ref_greedy, strict=True)]
            first = same.index(False) if False in same else len(same)
            agree = f"{sum(same)}/{len(same)} (first {first} equal)"
        served = f"{served_err * 100:6.2f}%" if served_err is not None else "   n/a "
        print(
            f"{name:<18} layer out rel err: weight-only {layer_err * 100:6.2f}%  served {served} | "
            f"logits cos min {cos.min():.5f} mean {cos.mean():.5f} | greedy {agree}"
        )

    print(
        f"{'scheme':<18} (medium model, {tokens}-token prompt; greedy on the narrow model "
        f"hidden {narrow.hidden_size} x {narrow.num_layers} layers)"
    )
    for name, spec in SCHEMES.items():
        qm = quantize_model(ChatGLMForCausalLM.random(cfg, seed=seed), spec)
        errs, served = [], []
        for lname, x in inputs.items():
            mod = qm.get_submodule(lname)
            ref = F.linear(x, fp.get_submodule(lname).weight)
            wo = F.linear(x, mod.dequantized_weight())
            errs.append(((wo - ref).norm() / ref.norm()).item())
            served.append(((mod(x) - ref).norm() / ref.norm()).item())
        g_ids = None  # groups wider than the narrow model's rows: not applicable
        if (spec.group_size or 0) <= narrow.hidden_size:
            nq = quantize_model(ChatGLMForCausalLM.random(narrow, seed=seed, std=NARROW_STD), spec)
            g_ids = greedy(nq, prompt, 24)
        report(name, sum(errs) / len(errs), sum(served) / len(served), run_prefill(qm, ids), g_ids)
    for kind in ("q8_0", "q4_0"):
        em = _swap_weights(
            ChatGLMForCausalLM.random(cfg, seed=seed), lambda w, kind=kind: emulate_ggml(w, kind)
        )
        errs = []
        for lname, x in inputs.items():
            ref = F.linear(x, fp.get_submodule(lname).weight)
            errs.append(
                ((F.linear(x, em.get_submodule(lname).weight) - ref).norm() / ref.norm()).item()
            )
        nm = _swap_weights(
            ChatGLMForCausalLM.random(narrow, seed=seed, std=NARROW_STD),
            lambda w, kind=kind: emulate_ggml(w, kind),
        )
        report(
            f"llama.cpp {kind}*",
            sum(errs) / len(errs),
            None,
            run_prefill(em, ids),
            greedy(nm, prompt, 24),
        )
    print("* llama.cpp's formats emulated on the same weights (weight-only), not llama.cpp itself")


# ---------------------------------------------------------------------------- decode
def bench_decode(cfg: ChatGLMConfig, batches: list[int], steps: int, context: int) -> None:
    print(
        f"\n## decode: model forward only (no engine), {context}-token contexts, {steps} steps, "
        f"{torch.get_num_threads()} threads"
    )
    variants: list[tuple[str, QuantSpec | None, torch.dtype]] = [
        ("fp32", None, torch.float32),
        ("bf16", None, torch.bfloat16),
        ("int8-row", QuantSpec(8), torch.float32),
        ("int4-g128", QuantSpec(4, 128), torch.float32),
        ("int8-row +head", QuantSpec(8, quantize_output_layer=True), torch.float32),
        ("int4-g128 +head", QuantSpec(4, 128, quantize_output_layer=True), torch.float32),
    ]
    for name, spec, dtype in variants:
        model = ChatGLMForCausalLM.random(cfg, dtype=dtype, seed=0)
        if spec is not None:
            quantize_model(model, spec)
        weight_bytes = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
        line = [f"{name:<16} weights {weight_bytes / 2**20:7.1f} MiB"]
        for b in batches:
            bs = 16
            blocks_per = -(-(context + steps + 1) // bs)
            caches = [
                torch.zeros(model.kv_cache_shape(b * blocks_per, bs), dtype=dtype)
                for _ in model.layers
            ]
            tables = torch.arange(b * blocks_per).view(b, blocks_per)

            def step(pos: int, b=b, caches=caches, tables=tables, bs=bs, model=model) -> None:
                slots = tables[:, pos // bs] * bs + pos % bs
                meta = AttentionMetadata(
                    slot_mapping=slots,
                    query_start_loc=list(range(b + 1)),
                    seq_lens=[pos + 1] * b,
                    block_tables=tables,
                    num_prefills=0,
                    block_size=bs,
                    seq_lens_tensor=torch.full((b,), pos + 1),
                )
                with torch.inference_mode():
                    hidden = model(torch.full((b,), 7), torch.full((b,), pos), caches, meta)
                    model.compute_logits(hidden).argmax(-1)

            step(context)
            t = time.perf_counter()
            for i in range(steps):
                step(context + 1 + i)
            dt = time.perf_counter() - t
            line.append(f"B={b}: {b * steps / dt:6.1f} tok/s")
        print(" | ".join(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--section", choices=["matmul", "shapes", "error", "decode", "all"], default="all"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ChatGLMConfig(**MEDIUM)
    if args.section in ("matmul", "all"):
        bench_matmul(cfg, args.batches, args.layers, args.reps)
    if args.section in ("shapes", "all"):
        bench_shapes(cfg, args.batches, args.layers, args.reps)
    if args.section in ("error", "all"):
        bench_error(cfg, ChatGLMConfig(**NARROW), seed=0, tokens=32)
    if args.section in ("decode", "all"):
        bench_decode(cfg, args.decode_batches, args.steps, args.context)


if __name__ == "__main__":
    main()
