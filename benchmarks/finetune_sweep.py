"""Fine-tune settings across seeds: ``benchmarks/finetune.py`` run once per variant and seed.

A fine-tune's seed moves the new-class Dice by about +-0.02, so one run cannot tell two
settings apart; this runs each variant for several seeds, ``--parallel`` processes at a
time (one per variant and seed, ``--threads`` torch threads each), and writes every
run's results and each variant's mean, min and max of the scenario measures to one JSON
(rewritten as runs finish, so a stopped sweep keeps what it did).

    python benchmarks/finetune_sweep.py --seeds 0 1 2 --only "new class" \\
        --variant defaults --variant "freeze=stage:1" --variant "lambda_scr=0 augment=false"

A variant is ``FIELD=VALUE`` pairs separated by spaces (``finetune.py --set``), or
``defaults``; ``--set`` adds pairs to every variant (e.g. ``device=cuda``). Runs go in
seed-major order, so an early stop leaves every variant with the same seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measures(name: str, r: dict) -> dict[str, float]:
    """The numbers a scenario is judged by (as ``finetune.measure`` prints them)."""
    if name == "corrections":
        return {"error_drop_pct": r["error_drop_pct"], "brain_lost_ml_after": r.get("brain_lost_ml_after", float("nan"))}  # fmt: skip
    if name == "new class":
        keys = ("outside_brain_ml_after", "brain_as_new_class_ml_after")
        return {"new_class_dice": r["new_class_dice"], **{k: r.get(k, float("nan")) for k in keys}}
    if name == "scribbles":
        return {"gm_dice": r["gm_wm_after"][0], "wm_dice": r["gm_wm_after"][1]}
    return {"round1_ml": r["outside_ml"][1], "round2_ml": r["outside_ml"][2], "round2_not_worse": float(r["outside_ml"][2] <= r["outside_ml"][1])}  # fmt: skip


def summarise(runs: list[dict]) -> dict:
    """Per variant and scenario: each measure's mean, min and max over the seeds done."""
    out: dict = {}
    for run in runs:
        for name, r in run["results"].items():
            for key, value in measures(name, r).items():
                out.setdefault(run["variant"], {}).setdefault(name, {}).setdefault(key, []).append(value)  # fmt: skip
    return {
        variant: {
            name: {
                k: {
                    "mean": round(statistics.fmean(v), 4),
                    "min": min(v),
                    "max": max(v),
                    "n": len(v),
                }
                for k, v in keys.items()
            }  # fmt: skip
            for name, keys in scenarios.items()
        }
        for variant, scenarios in out.items()
    }


def run_one(variant: str, seed: int, args, out: Path) -> dict:
    pairs = [] if variant == "defaults" else variant.split()
    cmd = [sys.executable, str(HERE / "finetune.py"), "--threads", str(args.threads), "--base", args.base,
           "--only", *args.only, "--out", str(out), "--set", *pairs, *args.set, f"seed={seed}"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "seed": seed, "error": proc.stderr[-2000:]}
    report = json.loads(out.read_text())
    return {"variant": variant, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "results": report["results"], "machine": report["machine"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=["new class"])
    parser.add_argument("--base", default="brain-tissue-unet3d-v1")
    parser.add_argument("--set", nargs="*", default=[], help="pairs added to every variant")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_sweep.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="finetune-sweep-"))
    jobs = [(v, s) for s in args.seeds for v in args.variant]
    runs: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, v, s, args, work / f"run-{i}.json") for i, (v, s) in enumerate(jobs)]  # fmt: skip
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            status = run.get("error", "").splitlines()[-1:] or {k: measures(k, r) for k, r in run["results"].items()}  # fmt: skip
            print(f"{run['variant']} seed {run['seed']}: {status}", flush=True)
            report = {"base": args.base, "only": args.only, "set": args.set, "seeds": args.seeds, "summary": summarise([r for r in runs if "results" in r]), "runs": runs}  # fmt: skip
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            tmp.replace(args.out)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
