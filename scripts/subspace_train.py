#!/usr/bin/env python
"""Leave-one-out: can a new task be learnt inside the subspace the other tasks' adapters share?

For each sample task: a zoo of the other seven sample adapters (``-k``), then the left-out task
trained three ways on the same data, batches, steps and seed, and the same classifier-head init:

  (a) a standard PEFT LoRA with the task's own rank, alpha, targets and learning rate (the
      settings its sample adapter was made with: ``make_sample_adapters.ADAPTERS``);
  (b) cores only in the zoo's subspace: ``rt.new_adapter(task, extra=0, heads=["classifier"])``;
  (c) the same with ``extra`` new trainable directions per side and module.

(b) and (c) are then committed into (copies of) the zoo, evaluated again through the runtime,
exported as PEFT adapters and evaluated once more after ``PeftModel.from_pretrained``.
Accuracy is on 1000 held-out examples with clean labels, as in ``sample_adapters/README.md``.

    python scripts/subspace_train.py --json subspace_train.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sample_adapters as msa  # noqa: E402  (sets the offline environment before transformers loads)
import sample_tasks  # noqa: E402

import sharecompress  # noqa: E402
from sharecompress import Zoo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def logits(model, tokenizer, texts, batch_size=64):
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=msa.MAX_LENGTH, return_tensors="pt")
        out.append(model(**enc).logits)
    return torch.cat(out)


def accuracy(z: torch.Tensor, labels) -> float:
    return (z.argmax(-1) == torch.tensor(labels)).float().mean().item()


def lora_count(r: int, modules: int, width: int = 384) -> int:
    return modules * r * 2 * width


def in_subspace(task, zoo_dir, extra, lr, lora_lr, head_lr, epochs, seed, tok, data, export_dir, grow="auto"):
    """Train ``task`` in the zoo's subspace, commit, export; every figure of one row."""
    (tr_x, tr_y), (ev_x, ev_y) = data
    torch.manual_seed(seed)  # the same head init as (a)
    model = msa.load_base_model(sample_tasks.TASKS[task])
    zoo = Zoo.open(zoo_dir)
    rt = zoo.attach(model)
    params = rt.new_adapter(task, extra=extra, heads=["classifier"], verbose=False)
    counts = dict(rt.training.counts)
    t0 = time.perf_counter()
    by_role = rt.training.groups
    assert sum(len(g) for g in by_role.values()) == len(params)
    # cores at their own rate; new directions (LoRA-like factors) at (a)'s; the head as chosen
    groups = [{"params": by_role["cores"], "lr": lr}, {"params": by_role["directions"], "lr": lora_lr},
              {"params": by_role["heads"], "lr": head_lr}]
    msa.fit(model, groups, lr, epochs, tok, tr_x, tr_y, seed, f"{task} extra={extra}")
    seconds = time.perf_counter() - t0
    before = logits(model, tok, ev_x)
    result = rt.commit(task, grow=grow)
    after = logits(model, tok, ev_x)
    rt.detach()
    Zoo.open(zoo_dir).export(task, export_dir, force=True)
    from peft import PeftModel

    torch.manual_seed(12345)  # a different fresh head: the export's own must replace it
    exported = PeftModel.from_pretrained(msa.load_base_model(sample_tasks.TASKS[task]), str(export_dir))
    via_export = logits(exported, tok, ev_x)
    return {
        "acc": accuracy(before, ev_y), "acc_committed": accuracy(after, ev_y), "acc_exported": accuracy(via_export, ev_y),
        "logit_diff_committed": (before - after).abs().max().item(),
        "logit_diff_exported": (before - via_export).abs().max().item(),
        "commit_path": result["path"], "stored_error": result["error"],
        "max_drift_of_others": max(result["drift"].values(), default=0.0),
        "params": counts["trainable"], "params_cores": counts["cores"] + counts["directions"],
        "params_head": counts["heads"], "train_seconds": seconds,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", type=int, default=16, help="k of each leave-one-out zoo (default 16)")
    ap.add_argument("--extra", type=int, default=2, help="new directions per side for (c) (default 2)")
    ap.add_argument("--lr", type=float, default=3e-2,
                    help="learning rate of the cores of (b) and (c) (default 3e-2); new directions and the head train at (a)'s")
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of the sample tasks")
    ap.add_argument("--head-lr", default="lora",
                    help="learning rate of the head in (b) and (c): 'lora' (= (a)'s, the default) or 'cores' (= --lr)")
    ap.add_argument("--grow", choices=["auto", "off"], default="auto", help="commit's grow for (c) (default auto)")
    ap.add_argument("--eval-seed", type=int, default=msa.EVAL_SEED,
                    help=f"seed of the held-out examples (default {msa.EVAL_SEED}, the sample adapters'; "
                         "the learning rate was chosen on seed 2, a validation set)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = msa.load_tokenizer()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="subspace_train."))
    try:
        for task, r, alpha, rslora, lr, epochs in msa.ADAPTERS:
            if args.tasks and task not in args.tasks:
                continue
            seed = 1000 + list(sample_tasks.TASKS).index(task)
            data = (sample_tasks.make_examples(task, msa.N_TRAIN, msa.TRAIN_SEED),
                    sample_tasks.make_examples(task, msa.N_EVAL, args.eval_seed, label_noise=0.0))
            others = [str(ROOT / "sample_adapters" / t) for t, *_ in msa.ADAPTERS if t != task]
            zoo_b, zoo_c = work / f"{task}.b", work / f"{task}.c"
            sharecompress.merge(others, zoo_b, k=args.k)
            shutil.copytree(zoo_b, zoo_c)
            print(f"== {task}: LoRA r={r}, {epochs} epochs; zoo of {len(others)} adapters at k={args.k}", flush=True)
            t0 = time.perf_counter()
            peft_model = msa.train_lora(task, sample_tasks.TASKS[task], r, alpha, rslora, lr, epochs, tok, *data[0], seed)
            seconds_a = time.perf_counter() - t0
            acc_a = accuracy(logits(peft_model, tok, data[1][0]), data[1][1])
            head = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n)
            row = {"task": task, "r": r, "epochs": epochs, "k": args.k, "acc_a": acc_a,
                   "params_a": lora_count(r, 12) + head, "params_a_lora": lora_count(r, 12), "train_seconds_a": seconds_a}
            head_lr = lr if args.head_lr == "lora" else args.lr if args.head_lr == "cores" else float(args.head_lr)
            row["b"] = in_subspace(task, zoo_b, 0, args.lr, lr, head_lr, epochs, seed, tok, data, work / f"{task}.b.export")
            row["c"] = in_subspace(task, zoo_c, args.extra, args.lr, lr, head_lr, epochs, seed, tok, data,
                                   work / f"{task}.c.export", args.grow)
            for m in ("b", "c"):
                row[m]["keeps"] = row[m]["acc"] / acc_a
                row[m]["fewer"] = row["params_a"] / row[m]["params"]
                row[m]["fewer_lora"] = row["params_a_lora"] / row[m]["params_cores"]
                row[m]["meets"] = row[m]["keeps"] >= 0.95 and row[m]["fewer"] >= 20
            rows.append(row)
            b, c = row["b"], row["c"]
            print(f"  (a) {acc_a:.3f} [{row['params_a']:,}]  (b) {b['acc']:.3f} [{b['params']:,}] committed "
                  f"{b['acc_committed']:.3f} exported {b['acc_exported']:.3f}  (c) {c['acc']:.3f} [{c['params']:,}] "
                  f"committed {c['acc_committed']:.3f} exported {c['acc_exported']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


def print_table(rows, args) -> None:
    print(f"\nzoo k={args.k}; (b) cores only, (c) extra={args.extra}, committed with grow={args.grow}; "
          "trainable parameters in brackets, heads included")
    print("| task | (a) PEFT LoRA | (b) cores | (b) committed / exported | (c) extra | (c) committed / exported | (c) commit | meets |")
    print("|---|---|---|---|---|---|---|---|")
    met = 0
    for row in rows:
        b, c = row["b"], row["c"]
        ok = [m for m in ("b", "c") if row[m]["meets"]]
        met += bool(ok)
        print(f"| {row['task']} | {row['acc_a']:.3f} [{row['params_a']:,}] | {b['acc']:.3f} [{b['params']:,}, {b['fewer']:.1f}x fewer] "
              f"| {b['acc_committed']:.3f} / {b['acc_exported']:.3f} (max logit diff {max(b['logit_diff_committed'], b['logit_diff_exported']):.1e}) "
              f"| {c['acc']:.3f} [{c['params']:,}, {c['fewer']:.1f}x fewer] | {c['acc_committed']:.3f} / {c['acc_exported']:.3f} "
              f"| {c['commit_path']}, error {c['stored_error']:.3f}, others drift ≤ {c['max_drift_of_others']:.3f} "
              f"| {'+'.join(ok) or 'no'} |")
    print(f"\ntarget (≥ 95% of (a)'s accuracy with ≥ 20x fewer trainable parameters, by (b) or (c)): met on {met} of {len(rows)} tasks")


if __name__ == "__main__":
    raise SystemExit(main())
