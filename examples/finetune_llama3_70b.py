"""Fine-tune Llama 3 70B with a plain single-device PyTorch loop plus one line.

The loop in `train_loop` is the kind users already have; the only added line is
`raytune_llama.enable_advanced_parallelization()`. raytune_llama plans the layout on the
driver, runs the loop in every Ray Train worker, and the model that `from_pretrained`
returns is already parallelized (each rank loading only its own shards).

    # on a Ray cluster of MI250 nodes (see cluster/README.md):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python examples/finetune_llama3_70b.py --config examples/configs/llama3_70b_mi250.yaml
    # here, on CPUs, with the tiny model and the bundled data (2 workers, ~1 minute):
    python examples/finetune_llama3_70b.py --tiny --set train.max_steps=8
    python examples/finetune_llama3_70b.py --tiny --set 'parallel.layout="pp=2,micro_batch_size=2"'
"""
import argparse
from pathlib import Path

import torch
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer

import raytune_llama

HERE = Path(__file__).resolve().parent


def mask_pads(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels: the inputs with padding ignored (-100)."""
    labels = input_ids.clone()
    labels[input_ids == tokenizer.pad_token_id] = -100
    return labels


def create_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Attention mask: 1 on tokens, 0 on padding."""
    return (input_ids != tokenizer.pad_token_id).long()


def train_loop(args: dict) -> None:
    """Runs on every Ray Train worker."""
    raytune_llama.enable_advanced_parallelization()          # the one added line
    model = AutoModelForCausalLM.from_pretrained(args["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(args["model_path"])
    optim = AdamW(model.parameters(), lr=args["lr"])
    train_dataloader = raytune_llama.get_dataset_shard("train")
    done = 0
    for epoch in range(args["num_train_epochs"]):
        for step, batch in enumerate(train_dataloader, start=1):
            input_ids = batch["input_ids"]
            inputs, labels = input_ids, mask_pads(input_ids, tokenizer)
            attn_mask = create_mask(inputs, tokenizer)
            outputs = model(input_ids.cuda(), attention_mask=attn_mask.cuda(), labels=labels.cuda(), use_cache=False)
            loss = outputs[0]
            loss.backward()
            optim.step()
            model.zero_grad(set_to_none=True)
            done += 1
            raytune_llama.log_step(loss=loss.item(), step=done, lr=optim.param_groups[0]["lr"])
            if done >= args["max_steps"]:
                return


def main(argv=None) -> dict:
    """Driver: load the config, then run train_loop on the cluster (local if no address)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "llama3_70b_mi250.yaml"))
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama on the bundled corpus, 2 CPU workers")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args(argv)
    config = HERE / "configs" / "tiny_cpu.yaml" if args.tiny else Path(args.config)
    cfg = raytune_llama.load_config(config, args.overrides)
    summary = raytune_llama.LlamaTrainer(cfg).launch(train_loop, {
        "lr": cfg.train.lr, "num_train_epochs": args.epochs, "max_steps": cfg.train.max_steps,
    })
    print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over steps "
          f"{summary['steps'][0]}..{summary['final_step']}")
    return summary


if __name__ == "__main__":
    main()
