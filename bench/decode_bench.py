"""Batch-1 decode speed, side by side: ours (fp32, bf16, int8, int4), transformers'
GlmForCausalLM with our weights (the seed's way), llama.cpp and chatglm.cpp, and the machine's
memory read bandwidth, all on one checkpoint and in one run.

    PYTHONPATH=. python bench/make_checkpoint.py --shape medium --out /tmp/ckpt-medium
    PYTHONPATH=. python bench/decode_bench.py --ckpt /tmp/ckpt-medium --peers-dir /tmp/peers-medium

Each engine decodes --new tokens greedily after the ChatGLM2 chat prompt for "你好" (the same
ids for every engine) in its own subprocess, one engine at a time (never two at once: on a
2-core machine they would spoil each other). A run measures every engine once, each of our rows
followed by the peers it is compared with; --runs runs are interleaved (so a burst of load
elsewhere hits all engines alike) and each row prints the median decode tok/s with the range.
The ratios are given twice: of the medians, and per run (the two rows measured within seconds
of each other), because some hosts change the memory rate they give a guest from minute to
minute. Decode tok/s = (tokens - 1) / time of the steps after the first (which is the
prefill), the same formula as the peers' scripts. "GB/s" = weight bytes read per
token (every linear, norm and the output layer; the embedding is one row) x tok/s, next to the
read bandwidth measured just before that row (a large torch.sum with the same thread count).

Ours runs through the engine (LLMEngine.step: scheduler, model, sampler, detokenizer), the way
the daemon does. Peers: --peers-dir holds their converted files (medium-f32.gguf ...,
medium-f32.ggml ...); --convert makes missing ones with ../shared/peers' scripts (its venv's
python, --peers-python). Rows whose engine is missing print why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = REPO.parent / "shared" / "peers"
QUERY = "你好"

# label -> (kind, detail); kinds: ours, hf, llama, chatglm, bandwidth
ENGINES = {
    "ours fp32": ("ours", "float32"),
    "ours bf16": ("ours", "bfloat16"),
    "ours int8": ("ours", "int8"),
    "ours int4": ("ours", "int4"),
    "transformers fp32": ("hf", "float32"),
    "transformers bf16": ("hf", "bfloat16"),
    "llama.cpp f32": ("llama", "f32"),
    "llama.cpp f16": ("llama", "f16"),
    "llama.cpp q8_0": ("llama", "q8_0"),
    "llama.cpp q4_0": ("llama", "q4_0"),
    "chatglm.cpp f32": ("chatglm", "f32"),
    "chatglm.cpp f16": ("chatglm", "f16"),
    "chatglm.cpp q8_0": ("chatglm", "q8_0"),
    "chatglm.cpp q4_0": ("chatglm", "q4_0"),
}
# ratios printed at the end: (ours, peer)
RATIOS = [
    ("ours fp32", "llama.cpp f32"),
    ("ours bf16", "llama.cpp f16"),
    ("ours int8", "llama.cpp q8_0"),
    ("ours int4", "llama.cpp q4_0"),
    ("ours fp32", "chatglm.cpp f32"),
    ("ours bf16", "chatglm.cpp f16"),
    ("ours int4", "chatglm.cpp q4_0"),
    ("ours fp32", "transformers fp32"),
    ("ours bf16", "transformers bf16"),
]


# ---- workers (each runs in its own subprocess and prints one JSON line) ---------------------


def _weight_bytes(model) -> int:
    """Bytes one decode token reads: every parameter and buffer except the embedding table."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "word_embeddings" in name or name.endswith("inv_freq"):
            continue
        total += t.numel() * t.element_size()
    return total


def ours_engine_args(ckpt: str, detail: str):
    """Our batch-1 engine's arguments for a row's detail ("float32", "bfloat16", "int8",
    "int4"); bench/step_scaling_bench.py builds the same engines."""
    from chatglm_serve.engine.config import EngineArgs, EngineConfig

    quantize = {"int8": 8, "int4": 4}.get(detail)
    return EngineArgs(
        model=ckpt,
        dtype=None if quantize else detail,
        device="cpu",
        quantize=quantize,
        engine=EngineConfig(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=512),
    )


def work_ours(ckpt: str, detail: str, new: int, threads: int) -> dict:
    import torch

    from chatglm_serve.engine.llm_engine import LLMEngine
    from chatglm_serve.engine.load import load_model
    from chatglm_serve.engine.types import SamplingParams

    torch.set_num_threads(threads)
    args = ours_engine_args(ckpt, detail)
    model, tok = load_model(args)
    weight_bytes = _weight_bytes(model)  # before the runner repacks anything
    engine = LLMEngine(model, tok, args.engine)
    prompt = tok.encode_chat(QUERY, [])
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)

    def generate() -> list[float]:
        engine.add_request(f"r{time.monotonic_ns()}", prompt, params)
        times = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return times

    generate()  # warm-up (first-call allocations, oneDNN primitive creation)
    engine.block_manager.reset_prefix_cache()
    times = generate()
    return {
        "tok_s": (len(times) - 1) / sum(times[1:]),
        "prefill_s": times[0],
        "weight_bytes": weight_bytes,
        "threads": torch.get_num_threads(),
    }


def work_hf(ckpt: str, detail: str, new: int, threads: int) -> dict:
    """transformers' generate, as the seed runs it: decode time = t(1 + new) - t(1)."""
    import torch

    from chatglm_serve.model.hf_glm import glm_from_state
    from chatglm_serve.model.loader import load_model_and_tokenizer

    torch.set_num_threads(threads)
    dtype = getattr(torch, detail)
    model, tok = load_model_and_tokenizer(ckpt, dtype=dtype, device="cpu")
    ref = glm_from_state(model.state_dict(), model.config, dtype)
    del model
    ids = torch.tensor([tok.encode_chat(QUERY, [])])

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    gen(2)  # warm-up
    first = min(gen(1) for _ in range(3))
    total = gen(1 + new)
    return {
        "tok_s": new / (total - first),
        "prefill_s": first,
        "weight_bytes": _weight_bytes_hf(ref),
        "threads": torch.get_num_threads(),
    }


def _weight_bytes_hf(ref) -> int:
    return sum(
        p.numel() * p.element_size() for n, p in ref.named_parameters() if "embed_tokens" not in n
    )


def sum_buffer(mib: int):
    """A float32 buffer far larger than any cache, on huge pages where ours get them
    (model/huge_pages.py), so a share of its read rate is like for like."""
    import torch

    from chatglm_serve.model.huge_pages import huge_page_buffer

    buf = huge_page_buffer(mib << 20)
    x = buf.view(torch.float32) if buf is not None else torch.empty(mib << 18)
    x.fill_(1.0)
    return x


def read_rate(x, reps: int) -> float:
    """GB/s of the best of `reps` sums over x, on the current thread count."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def work_bandwidth(threads: int, mib: int = 1024) -> dict:
    """Read bandwidth: the best of a few sums over sum_buffer(mib)."""
    import torch

    torch.set_num_threads(threads)
    x = sum_buffer(mib)
    x.sum()
    return {"gb_s": read_rate(x, 7), "threads": threads}


# ---- peers ------------------------------------------------------------------------------------


def peer_file(peers_dir: Path, kind: str, detail: str) -> Path:
    return peers_dir / f"medium-{detail}.{'gguf' if kind == 'llama' else 'ggml'}"


def convert_peers(args: argparse.Namespace, labels: list[str]) -> None:
    """Make missing peer files with the peers' own scripts (their converters, unmodified)."""
    py, scripts = args.peers_python, Path(args.peers_scripts)
    args.peers_dir.mkdir(parents=True, exist_ok=True)
    # chatglm.cpp's converter insists on the real config's "original_rope": true, which our
    # writer leaves out: a shadow dir with that key added, the weights linked
    shadow = Path(tempfile.mkdtemp(prefix="ckpt-cc-"))
    for f in Path(args.ckpt).iterdir():
        if f.name != "config.json":
            (shadow / f.name).symlink_to(f.resolve())
    cfg = json.loads((Path(args.ckpt) / "config.json").read_text())
    (shadow / "config.json").write_text(json.dumps(cfg | {"original_rope": True}))
    for label in labels:
        kind, detail = ENGINES[label]
        if kind not in ("llama", "chatglm"):
            continue
        out = peer_file(args.peers_dir, kind, detail)
        if out.exists():
            continue
        if kind == "chatglm":
            cmd = [py, scripts / "chatglm_cpp_peer.py", "convert", shadow, out, "--type", detail]
        elif detail in ("f32", "f16"):
            cmd = [py, scripts / "llama_cpp_peer.py", "convert", args.ckpt, out, "--type", detail]
        else:
            src = peer_file(args.peers_dir, "llama", "f16")
            if not src.exists():
                subprocess.run(
                    [py, scripts / "llama_cpp_peer.py", "convert", args.ckpt, src, "--type", "f16"],
                    check=True,
                    capture_output=True,
                )
            cmd = [py, scripts / "llama_cpp_peer.py", "quantize", src, out, "--type", detail]
        print(f"converting: {out.name}", flush=True)
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# the CPU flags our kernels and llama.cpp's pick their paths by, printed with every run
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def llama_repack(choice: str) -> bool:
    """Whether llama.cpp may repack q4_0/q8_0 weights. It does by default (its interleaved
    layouts are its fast path on AVX2/AVX-512), so we compare against that; only its AMX path
    crashed on our Xeon (SIGSEGV in ggml_backend_amx_mul_mat), so "auto" turns repacking off
    on CPUs with AMX, and says so in the table."""
    if choice == "auto":
        return "amx_tile" not in cpuinfo("flags").split()
    return choice == "on"


# Repacking off for llama.cpp's Python binding: patch the default model params before the
# peer script runs (the same as llama-server --no-repack).
NO_REPACK = """
import runpy, sys
import llama_cpp.llama_cpp as lc
_default = lc.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
lc.llama_model_default_params = _params
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_peer(args: argparse.Namespace, kind: str, detail: str) -> dict:
    path = peer_file(args.peers_dir, kind, detail)
    if not path.exists():
        return {"error": f"{path} missing (--convert makes it)"}
    script = "llama_cpp_peer.py" if kind == "llama" else "chatglm_cpp_peer.py"
    cmd = [args.peers_python, str(Path(args.peers_scripts) / script), "bench", str(path)]
    no_repack = (
        kind == "llama" and detail not in ("f32", "f16") and not llama_repack(args.llama_repack)
    )
    if no_repack:
        cmd[1:1] = ["-c", NO_REPACK]
    cmd += [args.ckpt, QUERY, "--new", str(args.new), "--reps", "1"]
    if kind == "llama":
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    first = json.loads(lines[0])
    # weight bytes ~ the file minus the token embedding (one row of it is read per token)
    return {
        "tok_s": first["decode_tok_s"],
        "prefill_s": first["prefill_s"],
        "weight_bytes": path.stat().st_size - args.embedding_bytes.get(detail, 0),
        "note": "no repack" if no_repack else "",
    }


def run_worker(args: argparse.Namespace, label: str) -> dict:
    kind, detail = ENGINES[label]
    if kind in ("llama", "chatglm"):
        if not Path(args.peers_python).exists():
            return {"error": f"{args.peers_python} missing (../shared/peers/setup_peers.sh)"}
        return run_peer(args, kind, detail)
    cmd = [sys.executable, __file__, "--worker", kind, "--detail", detail, "--ckpt", args.ckpt]
    cmd += ["--new", str(args.new), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", help="HF-format checkpoint dir (bench/make_checkpoint.py)")
    ap.add_argument("--peers-dir", type=Path, default=Path("/tmp/peers-medium"))
    ap.add_argument("--peers-python", default="/tmp/peers/venv/bin/python")
    ap.add_argument("--peers-scripts", default=str(DEFAULT_PEERS))
    ap.add_argument("--convert", action="store_true", help="make missing peer files first")
    ap.add_argument("--only", default="", help="comma-separated row labels (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated row labels to leave out")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument(
        "--llama-repack",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's repacking of q4_0/q8_0 (its default); auto: on unless the CPU has AMX, "
        "where its AMX path crashed",
    )
    ap.add_argument("--json-out", default="", help="append every measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--detail", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fn = {"ours": work_ours, "hf": work_hf}.get(args.worker)
        res = (
            work_bandwidth(args.threads)
            if args.worker == "bandwidth"
            else fn(args.ckpt, args.detail, args.new, args.threads)
        )
        print(json.dumps(res))
        return
    if not args.ckpt:
        ap.error("--ckpt is required")

    labels = [x.strip() for x in args.only.split(",") if x.strip()] or list(ENGINES)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    labels = [x for x in labels if x not in skip]
    unknown = [x for x in labels if x not in ENGINES]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ENGINES)}")
    cfg = json.loads((Path(args.ckpt) / "config.json").read_text())
    emb = cfg["padded_vocab_size"] * cfg["hidden_size"]
    args.embedding_bytes = {"f32": 4 * emb, "f16": 2 * emb, "q8_0": emb * 34 // 32}
    args.embedding_bytes["q4_0"] = emb * 18 // 32  # q4_0 keeps the embedding quantized too
    if args.convert:
        convert_peers(args, labels)

    cpu = cpuinfo("model name") or "unknown CPU"
    family = f"family {cpuinfo('cpu family') or '?'} model {cpuinfo('model') or '?'}"
    flags = [f for f in cpuinfo("flags").split() if f in KERNEL_FLAGS]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {cpu} ({family}; {' '.join(flags) or 'no AVX2'}), "
        f"{os.cpu_count()} CPUs, {args.threads} threads; "
        f"checkpoint {args.ckpt} ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['padded_vocab_size']}); {args.new} tokens after a "
        f"{QUERY!r} chat prompt; {args.runs} runs, median [min-max]",
        flush=True,
    )
    results: dict[str, list[dict]] = {label: [] for label in labels}
    labels = paired_order(labels)
    for run in range(args.runs):
        order = labels if run % 2 == 0 else labels[::-1]
        for label in order:
            bw = measure_bandwidth(args.threads)
            load = loadavg()
            res = run_worker(args, label) | {
                "label": label,
                "run": run,
                "loadavg": load,
                "bw_gb_s": bw,
            }
            results[label].append(res)
            shown = f"{res['tok_s']:.1f} tok/s" if "tok_s" in res else res["error"]
            print(
                f"  run {run + 1} {label:18} {shown}  (read bandwidth just before {bw:.1f} GB/s,"
                f" load avg {load:.1f})",
                flush=True,
            )
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(res) + "\n")

    def med(label: str) -> float | None:
        vals = [r["tok_s"] for r in results.get(label, []) if "tok_s" in r]
        return statistics.median(vals) if vals else None

    bandwidth = [r["bw_gb_s"] for rs in results.values() for r in rs]
    bw_med = statistics.median(bandwidth)
    print(
        f"\nmeasured read bandwidth ({args.threads} threads, before every row): {bw_med:.1f} GB/s "
        f"[{min(bandwidth):.1f}-{max(bandwidth):.1f}]"
    )
    print(f"{'engine':20} {'tok/s':>7} {'[min-max]':>15} {'MB/token':>9} {'GB/s':>6} {'of bw':>6}")
    for label in labels:
        rs = [r for r in results[label] if "tok_s" in r]
        if not rs:
            print(f"{label:20} {'n/a':>7}  {results[label][-1].get('error', '')}")
            continue
        vals = [r["tok_s"] for r in rs]
        m = statistics.median(vals)
        wb = rs[0]["weight_bytes"]
        # each run's share of the bandwidth measured just before it (the host's rate can change
        # from one minute to the next), then the median of those
        share = statistics.median(wb * r["tok_s"] / 1e9 / r["bw_gb_s"] for r in rs)
        rng = f"[{min(vals):.1f}-{max(vals):.1f}]"
        print(f"{label:20} {m:7.1f} {rng:>15} {wb / 1e6:9.1f} {wb * m / 1e9:6.1f} {share:6.0%}")
    print(
        "\nratios: of the medians; and per run (the two rows ran next to each other), median [min-max]"
    )
    for a, b in RATIOS:
        ma, mb = med(a), med(b)
        if ma and mb:
            per_run = paired_ratios(results[a], results[b])
            line = f"  {a} / {b}: {ma / mb:.2f}x"
            if per_run:
                line += f"; per run {statistics.median(per_run):.2f}x [{min(per_run):.2f}-{max(per_run):.2f}]"
            print(line)


def paired_order(labels: list[str]) -> list[str]:
    """labels with each of our rows followed by the peers it is compared with, so that a ratio
    compares two measurements taken within seconds of each other."""
    out: list[str] = []
    for label in labels:
        if label in out:
            continue
        out.append(label)
        out += [b for a, b in RATIOS if a == label and b in labels and b not in out]
    return out


def paired_ratios(ours: list[dict], peer: list[dict]) -> list[float]:
    """ours / peer tok/s of each run where both rows measured."""
    by_run = {r["run"]: r["tok_s"] for r in peer if "tok_s" in r}
    return [r["tok_s"] / by_run[r["run"]] for r in ours if "tok_s" in r and r["run"] in by_run]


def measure_bandwidth(threads: int) -> float:
    bw_cmd = [sys.executable, __file__, "--worker", "bandwidth", "--threads", str(threads)]
    bw = subprocess.run(bw_cmd, capture_output=True, text=True)
    return json.loads(bw.stdout.strip().splitlines()[-1])["gb_s"]


if __name__ == "__main__":
    main()
