"""A plain single-device fine-tuning loop with its own data pipeline, plus one line.

The loop in `train_loop` is what fine-tuning scripts already look like: an HF `datasets`
dataset tokenized with the model's tokenizer, a torch `DataLoader` with `DataCollatorWithPadding`
(right padding), AdamW with no weight decay on norms and biases, a transformers LR schedule,
gradient clipping, an evaluation pass every few steps, checkpoints, and `save_pretrained` at
the end. Under `enable_advanced_parallelization(global_batch_size=..., seq_len=...)` every worker
iterates the same loader (same seed) and the model takes its data-parallel rank's rows of each
batch; `raytune_llama.save_checkpoint` / `raytune_llama.resume` make it restartable.

    # here, on CPUs, with the tiny model and the bundled corpus (2 workers):
    python examples/finetune_own_dataloader.py --tiny --set train.max_steps=8
    # on a Ray cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python examples/finetune_own_dataloader.py --config examples/configs/llama3_70b_mi250.yaml
"""
import argparse
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithPadding, get_cosine_schedule_with_warmup

import raytune_llama

HERE = Path(__file__).resolve().parent


def load_splits(path: str, tokenizer, seq_len: int):
    """The JSONL corpus tokenized (truncated to seq_len), split into train and eval."""
    import datasets

    ds = datasets.load_dataset("json", data_files=path, split="train")
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True,
                remove_columns=ds.column_names)
    split = ds.train_test_split(test_size=0.05, seed=0)
    return split["train"], split["test"]


def loader(dataset, tokenizer, batch_size: int, seq_len: int, seed: int) -> DataLoader:
    """Every rank builds the same loader: same seed, so the same global batches in the same order."""
    collate = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=seq_len)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def labels_of(batch) -> torch.Tensor:
    """Labels: the inputs with padding ignored (-100)."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


def evaluate(model, batches) -> float:
    """Mean loss over the eval batches (each the global token-mean of its batch)."""
    model.eval()
    with torch.no_grad():
        losses = [float(model(b["input_ids"], attention_mask=b["attention_mask"], labels=labels_of(b)).loss)
                  for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train_loop(args: dict) -> None:
    """Runs on every Ray Train worker."""
    raytune_llama.enable_advanced_parallelization(global_batch_size=args["batch_size"], seq_len=args["seq_len"])
    model = AutoModelForCausalLM.from_pretrained(args["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer_path"])
    tokenizer.padding_side = "right"
    train_set, eval_set = load_splits(args["data"], tokenizer, args["seq_len"])
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "norm" in n or n.endswith("bias")]
    decay = [p for n, p in named if not ("norm" in n or n.endswith("bias"))]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args["lr"])
    scheduler = get_cosine_schedule_with_warmup(optim, args["warmup_steps"], args["max_steps"])
    step = raytune_llama.resume(optim, scheduler)  # 0 on a fresh run
    eval_batches = list(itertools.islice(loader(eval_set, tokenizer, args["batch_size"], args["seq_len"], 0), 2))
    per_epoch = len(train_set) // args["batch_size"]
    while step < args["stop_at"]:
        epoch, done = divmod(step, per_epoch)
        for batch in itertools.islice(loader(train_set, tokenizer, args["batch_size"], args["seq_len"], epoch),
                                      done, None):
            out = model(batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda(),
                        labels=labels_of(batch).cuda())
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            scheduler.step()
            model.zero_grad(set_to_none=True)
            step += 1
            extra = {"eval_loss": evaluate(model, eval_batches)} if step % args["eval_every"] == 0 else {}
            raytune_llama.log_step(loss=out.loss.item(), step=step, lr=scheduler.get_last_lr()[0], **extra)
            if step % args["checkpoint_every"] == 0 or step == args["stop_at"]:
                raytune_llama.save_checkpoint(step, optim, scheduler)
            if step >= args["stop_at"]:
                break
    if step >= args["max_steps"]:
        model.save_pretrained(args["export_dir"])  # every rank: streamed, no rank holds the whole model


def main(argv=None) -> dict:
    """Driver: load the config, then run train_loop on the cluster (local if no address)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "llama3_70b_mi250.yaml"))
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama on the bundled corpus, 2 CPU workers")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--eval-every", type=int, default=4)
    args = ap.parse_args(argv)
    config = HERE / "configs" / "tiny_cpu.yaml" if args.tiny else Path(args.config)
    cfg = raytune_llama.load_config(config, args.overrides)
    t = cfg.train
    summary = raytune_llama.LlamaTrainer(cfg).launch(train_loop, {
        "lr": t.lr, "warmup_steps": t.warmup_steps, "max_steps": t.max_steps, "batch_size": t.global_batch_size,
        "stop_at": min(t.max_steps, t.stop_after_steps or t.max_steps), "seq_len": cfg.data.seq_len,
        "data": str(Path(cfg.data.path).resolve()), "eval_every": args.eval_every,
        "checkpoint_every": cfg.checkpoint.every_steps or t.max_steps, "export_dir": str(cfg.export_path),
    })
    if summary["steps"]:
        print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over steps "
              f"{summary['steps'][0]}..{summary['final_step']}")
    return summary


if __name__ == "__main__":
    main()
