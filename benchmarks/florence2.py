"""Florence-2 with transformers' vision tower vs davit's, measured side by side in one run.

    python benchmarks/florence2.py [--rounds 5] [--out benchmarks/results]

The model is Florence-2-base's architecture built by hand (no weights can be downloaded here; random weights time
the same): the vision tower is transformers' ``Florence2VisionConfig`` defaults (DaViT dims 128/256/512/1024,
depths 1/1/9/1, window 12) with Florence-2-base's 768-d projection, the language model BART-base (d_model 768, 6+6
layers, 12 heads, FFN 3072, 1024 positions) with the original 51289-token vocabulary plus the image token. Both
sides hold the same weights: "davit" is a copy of the model after ``accelerate_florence2`` (one line).

Rows, each timed in interleaved rounds in this process (median; the CPU share the process got is recorded and rows
under 90% are marked *):
  encode  ``get_image_features`` on one 768x768 image (tower + projection, 577 image tokens), fp32 and bf16
          (transformers: autocast; davit: ``dtype="bf16"``), davit's tower on torch (``davit.optimize``) and OpenVINO;
  generate  a whole ``generate()`` of 20 new tokens (3 beams as in the model card's example, no early stop) for one
          image and a 5-token prompt, fp32.
Writes ``<out>/florence2-<time>.json`` and ``<out>/florence2-latest.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CPU_SHARE_MIN, MALLOC_ENV, _cpu_name, _reexec_with_malloc_tuning, interleaved  # noqa: E402

HERE = Path(__file__).resolve().parent
IMAGE_TOKEN = 51289


def florence2_base_config() -> Any:
    """Florence-2-base's architecture (see the module notes), written out by hand."""
    import transformers

    vision = transformers.Florence2VisionConfig(projection_dim=768, drop_path_rate=0.0)
    text = transformers.BartConfig(
        vocab_size=IMAGE_TOKEN + 1,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
    )
    return transformers.Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--size", type=int, default=768)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list: openvino,bf16,generate")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    _reexec_with_malloc_tuning()
    import torch
    import transformers

    import davit.integrations.florence2 as fl2

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf = transformers.Florence2ForConditionalGeneration(florence2_base_config()).eval()
    build_s = time.perf_counter() - t0
    ours = fl2.accelerate_florence2(copy.deepcopy(hf))
    x = torch.randn(1, 3, args.size, args.size)
    tokens = (args.size // 32) ** 2 + 1
    ids = torch.tensor([[0] + [IMAGE_TOKEN] * tokens + [100, 200, 300, 400, 2]])
    info: dict[str, Any] = {"build_s": round(build_s, 1), "image_tokens": tokens}

    def encode(m: Any, ctx: Any = contextlib.nullcontext) -> Any:
        def fn() -> Any:
            with torch.inference_mode(), ctx():
                return m.get_image_features(x).pooler_output

        return fn

    def bf16() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cands = {"encode fp32/transformers": encode(hf), "encode fp32/davit": encode(ours)}
    if "openvino" not in skip:
        t0 = time.perf_counter()
        ours_ov = fl2.accelerate_florence2(copy.deepcopy(hf), backend="openvino", example_input=x)
        info["openvino_convert_s"] = round(time.perf_counter() - t0, 1)
        cands["encode fp32/davit openvino"] = encode(ours_ov)
    if "bf16" not in skip:
        ours_bf = fl2.accelerate_florence2(copy.deepcopy(hf), dtype="bf16")
        cands["encode bf16/transformers"] = encode(hf, bf16)
        cands["encode bf16/davit"] = encode(ours_bf)
        if "openvino" not in skip:
            ours_ov_bf = fl2.accelerate_florence2(copy.deepcopy(hf), backend="openvino", dtype="bf16")
            cands["encode bf16/davit openvino"] = encode(ours_ov_bf)
    # Same image features: the swap is exact in fp32 (relative to the largest feature).
    with torch.inference_mode():
        ref = hf.get_image_features(x).pooler_output
        errs = {k: float((fn().float() - ref).abs().max() / ref.abs().max()) for k, fn in cands.items()}

    def generate(m: Any) -> Any:
        def fn() -> Any:
            with torch.inference_mode():
                return m.generate(
                    input_ids=ids,
                    pixel_values=x,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    num_beams=args.beams,
                    do_sample=False,
                )

        return fn

    if "generate" not in skip:
        cands["generate fp32/transformers"] = generate(hf)
        cands["generate fp32/davit"] = generate(ours)
        with torch.inference_mode():
            same = torch.equal(cands["generate fp32/transformers"](), cands["generate fp32/davit"]())
        info["generate_same_tokens"] = same
    load0 = os.getloadavg()[0]
    print(f"florence2: timing {len(cands)} rows x {args.rounds} rounds (load {load0:.1f})", flush=True)
    timed = interleaved(cands, rounds=args.rounds, reps=1, threads=args.threads)
    rows = {}
    for k, v in timed.items():
        task, side = k.split("/", 1)
        base = timed[f"{task}/transformers"]["sec"]
        rows[k] = {
            "task": task,
            "path": side,
            "ms": round(v["sec"] * 1000, 1),
            "speedup_vs_transformers": round(base / v["sec"], 3),
            "spread": round(v["spread"], 3),
            "cpu_share": round(v["cpu_share"], 2),
            "rel_err_vs_transformers_fp32": errs.get(k),
        }
    res = {
        "meta": {
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": _cpu_name(),
            "threads": args.threads,
            "size": args.size,
            "new_tokens": args.new_tokens,
            "beams": args.beams,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "load_start": load0,
            "load_end": os.getloadavg()[0],
            "command": " ".join(["florence2.py", *(argv if argv is not None else sys.argv[1:])]),
        },
        "info": info,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"florence2-{stamp}.json", "florence2-latest.json"):
        (out / name).write_text(json.dumps(res, indent=2))
    print(
        f"\nFlorence-2-base architecture (random weights), {args.size}x{args.size}, batch 1  |  {res['meta']['cpu']}"
        f"  |  {args.threads} threads  |  load {load0:.1f} -> {res['meta']['load_end']:.1f}"
    )
    print(f"{'':<44}{'ms':>10}{'vs transformers':>17}{'cpu':>7}{'rel err':>10}")
    for k, r in rows.items():
        mark = "*" if r["cpu_share"] < CPU_SHARE_MIN else " "
        err = f"{r['rel_err_vs_transformers_fp32']:.1e}" if r["rel_err_vs_transformers_fp32"] is not None else "-"
        print(f"{k:<44}{r['ms']:>10.1f}{r['speedup_vs_transformers']:>16.2f}x{r['cpu_share']:>6.2f}{mark}{err:>10}")
    if any(r["cpu_share"] < CPU_SHARE_MIN for r in rows.values()):
        print(f"  * the process got < {CPU_SHARE_MIN:.0%} of its CPU time in these rows (other load): not claims")
    if "generate_same_tokens" in info:
        print(f"generate: same tokens on both sides: {info['generate_same_tokens']}")
    print(f"wrote {out / f'florence2-{stamp}.json'}")
    return res


if __name__ == "__main__":
    main()
