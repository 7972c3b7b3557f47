"""GPU check (one H100/H200, no Ray, no internet): a stack of Llama-3-8B-shaped decoder layers
(vocab 128256 embedding + lm_head kept) in bf16, SDPA attention, fused AdamW; for recompute
none/selective/full x micro-batch sizes it measures tokens/s, MFU and peak memory and compares
them with the planner's estimate() for the truncated model. Finishes in < 5 minutes.

    python bench/gpu_check.py [--out bench/gpu_check.json] [--layers N] [--seq 4096] [--mbs 1,2,4]
    python bench/gpu_check.py --smoke        # tiny fp32 version on CPU (2 layers, 2 steps)

Timing: torch.cuda.synchronize() before every clock read; step time = median of --steps steps
after --warmup. Peak = torch.cuda.max_memory_allocated() over the measured steps (reserved too).
Model FLOPs per token = 6 * N_nonembedding + 12 * L * d * s (docs/planner.md; lm_head counted);
MFU peak = the planner's h100/h200 profile peak_flops (989e12), picked by device name.
Pure-bf16 training (weights, grads, AdamW m/v in bf16) = the planner's optimizer "adamw_bf16".
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
SMOKE = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False)
TIME_BUDGET_S = 240.0  # stop starting new configurations after this (the whole run must stay < 5 min)


def _local_wrap(layer, mode: str):
    """Fallback recompute wrapper (same policy as raytune_llama's recompute.py) if it cannot be imported."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    if mode == "none":
        return layer
    if mode == "full":
        return checkpoint_wrapper(layer, preserve_rng_state=False)
    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for n in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, n):
            save.add(getattr(aten, n).default)

    def policy(ctx, op, *a, **k):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE
    ctx_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint_wrapper(layer, preserve_rng_state=False, context_fn=ctx_fn)


def build_runner(model, mode: str):
    """(module ids -> logits) with every decoder layer wrapped for `mode`; says which helper was used."""
    try:
        from raytune_llama.engine.parallel.model_stages import build_stage
        from raytune_llama.engine.parallel.recompute import apply_recompute

        stage = build_stage(model, 0, 1)  # the engine's stage module; shares the HF layers
        apply_recompute(stage, mode)
        return stage, "raytune_llama apply_recompute"
    except ImportError as exc:  # pragma: no cover - only on a stack where the engine will not import
        body = model.model
        wrapped = [_local_wrap(layer, mode) for layer in body.layers]

        def run(ids):
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            h = body.embed_tokens(ids)
            pe = body.rotary_emb(h, pos)
            for layer in wrapped:
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            return model.lm_head(body.norm(h))
        return run, f"local checkpoint_wrapper ({exc})"


def planner_prediction(cfg: dict, hardware: str, seq: int, mbs: int, mode: str) -> dict:
    """estimate() for this truncated model on 1 device: predicted memory and step time."""
    try:
        from raytune_llama.planner.api import estimate
        from raytune_llama.planner.hardware import load_hardware

        est = estimate(cfg, cluster={"hardware": hardware, "nodes": 1, "devices_per_node": 1},
                       workload={"seq_len": seq, "global_batch": mbs, "optimizer": "adamw_bf16", "headroom": 0.0},
                       layout=f"dp_replicate=1,micro_batch_size={mbs},grad_accum=1,recompute={mode}")
        hw = load_hardware(hardware)
        return {"pred_memory_bytes": est.memory.total, "pred_runtime_reserved": hw.runtime_reserved_bytes,
                "pred_memory_terms": est.memory.terms(), "pred_step_s": est.time.step_time,
                "pred_mfu": est.time.mfu, "pred_feasible": est.feasible, "peak_flops": hw.peak_flops}
    except Exception as exc:  # noqa: BLE001 - a planner problem must not lose the GPU measurements
        return {"planner_error": repr(exc)}


def measure(model, opt, fwd, mbs: int, seq: int, vocab: int, steps: int, warmup: int, device) -> dict:
    """Median step time and peak memory of `steps` training steps (ids -> CE -> backward -> AdamW)."""
    from raytune_llama.engine.loss import summed_causal_lm_loss

    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (mbs, seq), generator=g).to(device)
    n_tokens = mbs * (seq - 1)  # target tokens (no padding)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = summed_causal_lm_loss(fwd(ids), ids) / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times), "step_times_s": times, "loss": float(loss.detach())}
    if cuda:
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
    return out


def main() -> None:
    """Run the sweep, print the table, write JSON (rows + calibrate-ready records)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 CPU run (2 layers, 2 steps)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: 8 on <100 GB, 16 above)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", default="1,2,4")
    ap.add_argument("--modes", default="none,selective,full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    t_start = time.time()
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_llama.planner.model_spec import from_hf_config

    if args.smoke:
        device, dtype, hardware = torch.device("cpu"), torch.float32, "cpu"
        cfg, seq, mbs_list, steps, warmup = dict(SMOKE), 64, [1, 2], 2, 0
        name = "cpu (smoke)"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on CPU")
        device, dtype = torch.device("cuda", 0), torch.bfloat16
        name = torch.cuda.get_device_name(0)
        hardware = "h200" if "H200" in name.upper() else "h100"
        mem = torch.cuda.get_device_properties(0).total_memory
        layers = args.layers or (16 if mem > 100e9 else 8)
        cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
        seq, mbs_list, steps, warmup = args.seq, [int(x) for x in args.mbs.split(",")], args.steps, args.warmup
    spec = from_hf_config(cfg)
    flops_tok = spec.model_flops_per_token(seq)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="sdpa")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    torch.set_default_dtype(prev)
    model.train()
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
        fused = True
    except (RuntimeError, TypeError):
        opt, fused = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1), False
    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{spec.num_layers} {'tiny' if args.smoke else 'Llama-3-8B-shaped'} layers, vocab {spec.vocab_size}, "
          f"{spec.n_params / 1e6:.1f}M params, "
          f"{str(dtype).replace('torch.', '')}, fused AdamW={fused}, seq {seq}, planner hardware '{hardware}'")
    rows, records, helper = [], [], ""
    for mode in args.modes.split(","):
        fwd, helper = build_runner(model, mode)
        for mbs in mbs_list:
            row = {"recompute": mode, "mbs": mbs, "seq": seq}
            row.update(planner_prediction(cfg, hardware, seq, mbs, mode))
            if time.time() - t_start > TIME_BUDGET_S and not args.smoke:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            try:
                row.update(measure(model, opt, fwd, mbs, seq, spec.vocab_size, steps, warmup, device))
            except torch.OutOfMemoryError as exc:
                row["oom"] = str(exc).splitlines()[0]
            if "oom" in row:  # outside the except block, so the failed step's frames are gone
                opt.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
            if "step_s" in row:
                tok = mbs * seq
                row["tokens_per_s"] = tok / row["step_s"]
                peak = row.get("peak_flops")
                row["mfu"] = flops_tok * tok / row["step_s"] / peak if peak else None
                row["hfu"] = row["mfu"] * (4 / 3 if mode == "full" else 1) if row["mfu"] is not None else None
                records.append({"model": cfg, "hardware": hardware, "nodes": 1, "devices_per_node": 1,
                                "seq_len": seq, "global_batch": mbs, "optimizer": "adamw_bf16",
                                "layout": f"dp_replicate=1,micro_batch_size={mbs},grad_accum=1,recompute={mode}",
                                "measured_step_time_s": row["step_s"],
                                "measured_peak_memory_bytes": row.get("peak_allocated")})
            rows.append(row)
            print(_fmt(row), flush=True)
    gib = 2**30
    print(f"\n{'recompute':<10} {'mbs':>3} {'step ms':>8} {'tok/s':>8} {'MFU':>6} {'HFU':>6} {'peak GiB':>8} "
          f"{'pred GiB':>8} {'pred-rt':>7} {'meas/pred-rt':>12} {'pred ms':>8} {'pred MFU':>8}")
    for r in rows:
        print(_fmt(r, gib))
    result = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "hardware_profile": hardware, "layers": spec.num_layers, "n_params": spec.n_params,
              "model_flops_per_token": flops_tok, "recompute_helper": helper, "fused_adamw": fused,
              "smoke": args.smoke, "rows": rows, "calibration_records": records,
              "wall_s": time.time() - t_start,
              "note": "pred-rt = planner total minus its runtime reserve (CUDA context etc. are not in "
                      "max_memory_allocated); calibration_records feed `raytune-llama calibrate` "
                      "(they carry peak allocated, so calibrate with runtime_reserved_bytes: 0)"}
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {args.out} ({time.time() - t_start:.0f} s)")


def _fmt(r: dict, gib: float = 2**30) -> str:
    if "step_s" not in r:
        why = r.get("oom") or r.get("skipped") or r.get("planner_error", "")
        pred = r.get("pred_memory_bytes")
        return (f"{r['recompute']:<10} {r['mbs']:>3}  not run: {why[:70]}"
                + (f" (planner predicted {pred / gib:.1f} GiB)" if pred else ""))
    pred = r.get("pred_memory_bytes")
    pred_rt = pred - r["pred_runtime_reserved"] if pred else None
    meas = r.get("peak_allocated")
    cells = [f"{r['recompute']:<10}", f"{r['mbs']:>3}", f"{1e3 * r['step_s']:8.1f}", f"{r['tokens_per_s']:8.0f}",
             f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}",
             f"{100 * r['hfu']:5.1f}%" if r.get("hfu") is not None else f"{'-':>6}",
             f"{meas / gib:8.2f}" if meas else f"{'-':>8}",
             f"{pred / gib:8.2f}" if pred else f"{'-':>8}", f"{pred_rt / gib:7.2f}" if pred_rt else f"{'-':>7}",
             f"{meas / pred_rt:12.2f}" if meas and pred_rt else f"{'-':>12}",
             f"{1e3 * r['pred_step_s']:8.1f}" if r.get("pred_step_s") else f"{'-':>8}",
             f"{100 * r['pred_mfu']:7.1f}%" if r.get("pred_mfu") else f"{'-':>8}"]
    return " ".join(cells)


if __name__ == "__main__":
    main()
