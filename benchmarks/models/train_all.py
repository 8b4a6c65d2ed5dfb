"""Train every evaluation model, save its checkpoint and print a summary table.

Run from the repository root::

    python -m benchmarks.models.train_all              # train all, write checkpoints/
    python -m benchmarks.models.train_all --threads 1  # as measured in README.md
    python -m benchmarks.models.train_all --twice --no-save   # determinism check
    python -m benchmarks.models.train_all --models digits_cnn text_llama

Checkpoints go to ``benchmarks/models/checkpoints/<name>.pt`` (plain
``state_dict``s) and the table is also written to
``benchmarks/models/checkpoints/metrics.json`` (unless ``--no-save``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.models import digits, text_lm

ALL_MODELS = digits.MODEL_NAMES + text_lm.MODEL_NAMES


def _train_one(name, seed, digits_data, text_data, steps):
    """Train ``name``; return (model, train seconds, metric name, metric value)."""
    t0 = time.perf_counter()
    if name in digits.MODEL_NAMES:
        model = digits.FAMILY.trainers[name](seed=seed, data=digits_data)
        dt = time.perf_counter() - t0
        return model, dt, "test_acc", digits.accuracy(model, digits_data[2], digits_data[3])
    kwargs = {} if steps is None else {"steps": steps}
    model = text_lm.FAMILY.trainers[name](seed=seed, data=text_data, **kwargs)
    dt = time.perf_counter() - t0
    return model, dt, "val_ppl", text_lm.perplexity(model, text_data[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=list(ALL_MODELS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help=f"LM training steps (default {text_lm.STEPS})")
    ap.add_argument("--twice", action="store_true",
                    help="train each model a second time with the same seed and compare")
    ap.add_argument("--no-save", action="store_true", help="do not write checkpoints/metrics")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    digits_data = digits.load_data()
    text_data = text_lm.load_corpus()
    info = text_lm.corpus_info()
    uni = text_lm.unigram_perplexity(*text_data)
    bi = text_lm.bigram_perplexity(*text_data)
    print(f"digits: train {len(digits_data[1])} / test {len(digits_data[3])} images")
    print(f"corpus: {info['bytes']} bytes, {info['modules']} stdlib modules, Python "
          f"{info['python']}, sha256 {info['sha256'][:16]}; train {len(text_data[0])} / "
          f"val {len(text_data[1])} bytes")
    print(f"text baselines (val perplexity): unigram {uni:.2f}, bigram {bi:.2f}")
    print(f"torch {torch.__version__}, {threads} thread(s)", flush=True)

    rows = []
    for name in args.models:
        model, dt, metric, value = _train_one(name, args.seed, digits_data, text_data, args.steps)
        row = {
            "model": name,
            "date": datetime.date.today().isoformat(),
            "torch_threads": threads,
            "class": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "train_s": round(dt, 1),
            "metric": metric,
            "value": value,
        }
        if not args.no_save:
            mod = digits if name in digits.MODEL_NAMES else text_lm
            path = mod.save(model, name)
            row["ckpt_mb"] = round(path.stat().st_size / 2**20, 2)
        if args.twice:
            _, dt2, _, value2 = _train_one(name, args.seed, digits_data, text_data, args.steps)
            row["train_s_2"] = round(dt2, 1)
            row["value_2"] = value2
            row["rel_diff"] = abs(value2 - value) / abs(value)
        rows.append(row)
        print(f"  {name}: {metric}={value:.4f} in {dt:.1f}s", flush=True)

    header = f"{'model':<12} {'class':<28} {'params':>8} {'ckpt MB':>8} {'train s':>8} {'metric':>9} {'value':>8}"
    if args.twice:
        header += f" {'value(2)':>9} {'rel diff':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['model']:<12} {r['class']:<28} {r['params']:>8} "
                f"{r.get('ckpt_mb', float('nan')):>8.2f} {r['train_s']:>8.1f} "
                f"{r['metric']:>9} {r['value']:>8.4f}")
        if args.twice:
            line += f" {r['value_2']:>9.4f} {r['rel_diff']:>9.2e}"
        print(line)

    if not args.no_save:
        out = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": __import__("os").cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "corpus": info,
            "text_baselines": {"unigram_ppl": uni, "bigram_ppl": bi},
            "seed": args.seed,
            "models": rows,
        }
        path = digits.CHECKPOINT_DIR / "metrics.json"
        if path.exists():  # keep entries of models not retrained this time
            try:
                old = {r["model"]: r for r in json.loads(path.read_text()).get("models", [])}
            except (ValueError, KeyError, TypeError):
                old = {}
            for r in rows:
                old[r["model"]] = r
            out["models"] = [old[n] for n in ALL_MODELS if n in old]
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
