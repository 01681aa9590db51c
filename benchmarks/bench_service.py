"""The prediction service against plain fp32 eager PyTorch, in ONE run: every ratio the goals use.

    .venv/bin/python benchmarks/bench_service.py [--photos 0] [--repeats 30] [--requests 60]
                                                  [--per-client 8] [--start-rounds 2] [--skip-start] [--compile]

Prints the CPU's flags, builds the ViT-S/16 random-weights artifact once (common.build_artifact),
then runs in this process bench_forward.py (every CPU option's batch-1 forward and fidelity),
bench_http.py (/predict against the bare served forward, the floors, 1 and 16 clients) and,
unless --skip-start, bench_start.py (start to ready and memory), each printing its own figures;
at the end one table: each ratio to the fp32 eager batch-1 forward measured in this same run,
beside its goal. Asserts nothing. Each script also runs alone (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import bench_forward
import bench_http
import bench_start
from common import build_artifact, cpu_flags_line, held_out

GOALS = {"served": 0.45, "predict": 0.55, "overhead": 1.0, "throughput": 3.0, "tail": 3.0}


def table_rows(forward: dict, http: dict) -> list[tuple[str, str, str, str, bool | None]]:
    """(figure, measured, ratio, goal, met) for each goal; met None: the figure means nothing."""
    fp32, large = forward["fp32_ms"], http["paired"]["1920x1080"]
    naive, sixteen = 1000 / fp32, http["sixteen"]
    rows = [("fp32 eager batch-1 forward (the yardstick)", f"{fp32:.1f} ms", "1×", "", True),
            (f"served backbone forward: {forward['served']}", f"{forward['served_ms']:.1f} ms",
             f"{forward['served_ms'] / fp32:.2f}×", f"≤ {GOALS['served']}×", forward["served_ms"] <= GOALS["served"] * fp32),
            ("/predict p50, 1920×1080 JPEG", f"{large['http_p50']:.1f} ms", f"{large['http_p50'] / fp32:.2f}×",
             f"≤ {GOALS['predict']}×", large["http_p50"] <= GOALS["predict"] * fp32)]
    for name, r in http["paired"].items():
        overhead = r["http_p50"] - r["bare_p50"]
        below = overhead < r["floor"]  # the pairing did not cancel other load
        rows.append((f"HTTP p50 − bare served forward p50, {name.replace('x', '×')}",
                     f"{overhead:+.1f} ms (floor {r['floor']:.1f} ms; back to back {r['hot']:.1f})",
                     f"floor {overhead - r['floor']:+.1f} ms (back-to-back floor {overhead - r['hot']:+.1f})",
                     f"≤ floor + {GOALS['overhead']} ms", None if below else overhead <= r["floor"] + GOALS["overhead"]))
    rows += [("16-client throughput / naive fp32 rate (1000 / fp32 ms)", f"{sixteen['rps']:.1f} / {naive:.1f} req/s",
              f"{sixteen['rps'] / naive:.2f}×", f"≥ {GOALS['throughput']}×", sixteen["rps"] >= GOALS["throughput"] * naive),
             ("16-client p99 / p50", f"{sixteen['p99']:.1f} / {sixteen['p50']:.1f} ms",
              f"{sixteen['p99'] / sixteen['p50']:.2f}", f"≤ {GOALS['tail']:g}", sixteen["p99"] <= GOALS["tail"] * sixteen["p50"])]
    return rows


def print_table(forward: dict, http: dict) -> None:
    print(f"\nratios to the fp32 eager batch-1 forward, all from this one run ({cpu_flags_line()}):\n")
    print("| figure | measured | ratio | goal | met |\n|---|---|---|---|---|")
    for figure, measured, ratio, goal, met in table_rows(forward, http):
        verdict = "" if not goal else "below its floor: rerun quiet" if met is None else "yes" if met else "NO"
        print(f"| {figure} | {measured} | {ratio} | {goal} | {verdict} |")
    print(f"\nserved default: {forward['why']}")
    print("an overhead below its floor means other load slowed the bare forwards more than the service's: "
          "that figure means nothing; rerun on a quiet machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_forward.add_arguments(parser)
    bench_http.add_arguments(parser)
    parser.add_argument("--start-rounds", type=int, default=2, help="service starts of each kind for bench_start")
    parser.add_argument("--skip-start", action="store_true", help="skip start to ready and memory")
    args = parser.parse_args()
    print(cpu_flags_line())
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        print(f"building a ViT-S/16 artifact (random official-format weights, head on "
              f"{2 * args.train_per_class} sample photos)")
        model_dir = build_artifact(work, args.train_per_class)
        forward = bench_forward.run_forward(model_dir, held_out(args.train_per_class, args.photos), args.repeats,
                                            args.compile)
        http = bench_http.run_http(model_dir, work, forward["fp32_ms"], args)
        if not args.skip_start and args.start_rounds:
            bench_start.run_start(model_dir, work, args.start_rounds)
    print_table(forward, http)


if __name__ == "__main__":
    main()
