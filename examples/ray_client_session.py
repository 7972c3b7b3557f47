"""Interactive Ray client session against a running cluster: plan Llama 3 70B on 64 MI250
GCDs, then fine-tune the tiny config for a few steps on the cluster.

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.raytune/mi250-auth/auth_token
    python examples/ray_client_session.py --address ray://HEAD:10001 \
        --set data.path=/mnt/shared/data/tiny_corpus.jsonl \
        --set model.name_or_path=/mnt/shared/models/tiny-llama --set run.storage_path=/mnt/shared/runs

The same steps work line by line in a Python shell or notebook:

    import ray, raytune_llama
    from raytune_llama.trainer.remote_fit import fit_remote
    ray.init("ray://HEAD:10001")
    raytune_llama.plan(model="llama3-70b", cluster={"hardware": "mi250", "nodes": 8, "devices_per_node": 8},
                       workload={"seq_len": 1024, "global_batch": 512}).to_text()
    summary = fit_remote(raytune_llama.load_config("examples/configs/tiny_cpu.yaml", [...]))

`plan()` is pure computation and runs in the client. The fit runs through `fit_remote`: under
Ray client the driver code runs in the client process, and `LlamaTrainer(cfg).fit()` called
there directly fails in Ray Data (Ray 2.60's streaming executor needs a core worker, which a
Ray client process does not have), so `fit_remote` runs the whole fit as one Ray task on the
cluster and returns its summary (see raytune_llama/trainer/remote_fit.py).

Paths: the fit reads and writes on the cluster. Relative paths in the config are made absolute
against the current directory here, which is right only when this machine and the cluster
see the same files (on the head node, or the repo on the shared mount); otherwise pass
absolute cluster paths with --set.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A short run unless --set says otherwise (the user's overrides come after these).
TINY_DEFAULTS = ["train.max_steps=4", "checkpoint.every_steps=4", "run.name=ray-client-tiny"]
PLAN_70B = dict(model="llama3-70b", cluster={"hardware": "mi250", "nodes": 8, "devices_per_node": 8},
                workload={"seq_len": 1024, "global_batch": 512})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="Ray client address, ray://HOST:10001")
    ap.add_argument("--config", default=str(HERE / "configs" / "tiny_cpu.yaml"), help="run config to fit")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable), e.g. --set train.max_steps=8")
    ap.add_argument("--plan-only", action="store_true", help="plan the 70B case and stop")
    ap.add_argument("--json", action="store_true", help="also print the fit summary as one JSON line")
    args = ap.parse_args(argv)

    import ray

    import raytune_llama
    from raytune_llama.config import ConfigError
    from raytune_llama.trainer.llama_trainer import format_summary
    from raytune_llama.trainer.remote_fit import fit_remote
    from raytune_llama.trainer.run_dir import absolutize

    if not args.address.startswith("ray://"):
        ap.error(f"--address {args.address!r}: expected a Ray client address ray://HOST:PORT")
    try:
        # Validate before connecting: a bad config fails in a second, not after a connect.
        cfg = raytune_llama.load_config(args.config, TINY_DEFAULTS + args.overrides)
        cfg = absolutize(cfg.validate(check_files=False))
    except ConfigError as exc:
        print(f"ray_client_session: {exc}", file=sys.stderr)
        return 2

    t0 = time.time()
    ray.init(args.address)
    res = ray.cluster_resources()
    print(f"[client] connected to {args.address} in {time.time() - t0:.1f} s "
          f"(Ray {ray.__version__}, client mode: {ray.util.client.ray.is_connected()}); "
          f"cluster: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU", flush=True)
    try:
        t0 = time.time()
        result = raytune_llama.plan(**PLAN_70B)
        print(f"[client] plan for Llama 3 70B on 64 MI250 GCDs ({time.time() - t0:.2f} s, computed in the client):")
        print(result.to_text(), flush=True)
        if args.plan_only:
            return 0

        print(f"[client] fitting {cfg.run.name} on the cluster: model {cfg.model.name_or_path}, "
              f"data {cfg.data.path}, run dir {cfg.run_dir}", flush=True)
        try:
            summary = fit_remote(cfg)
        except ConfigError as exc:
            print(f"ray_client_session: {exc}", file=sys.stderr)
            return 2
        print(format_summary(summary), flush=True)
        if args.json:
            print("SUMMARY_JSON " + json.dumps(summary), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
