"""Load benchmark: the gateway on `make serve` defaults, from light load to three times its capacity.

    python bench/bench_load.py [--quick] [--sweep]     (or: make bench-load)

One model server (model_server.py) and one gateway under gunicorn with the defaults of gunicorn.conf.py and
gateway_parts/settings.py, as `make serve` starts them, on the converted stand-in (or models/clothing-model after
`make model`), all on this machine with the load generator (loadtest.py, dataset photo uploads):

- closed loop at 1, 2, 4, 8, 16, 32 and 64 clients, each client sending its next request once answered (and
  not honouring Retry-After: the hardest client for a gateway that sheds);
- the capacity: the best goodput of those rows;
- open loop at 0.5x, 1x, 2x and 3x that capacity: Poisson arrivals at a fixed rate, latency from arrival.

Each row runs five times for 8 s, the rows interleaved so that the machine's background drift hits all rows
alike. It reports goodput (answered 200 per second within the row's window), the
share shed (503 overloaded), requests that got no HTTP answer at all, and p50 and p99 of the successful
requests, with a plot of goodput and p99 against offered load (bench/load.png). The targets (issue 11) are
ratios within this one run: no request without an answer in any row; goodput at 64 clients and at 3x capacity
at least 90% of the run's best; p99 under overload within the admission budget plus one service time (the row's
p99 of the gateway's work on a request, from its own timings). `--sweep` also runs the two overload rows for other
admission settings, the measurement the defaults were chosen by.

Writes bench/load.md, bench/load.json and bench/load.png. It measures; it never fails on a number.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import runpy
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import (
    OUTPUT,
    ROOT,
    convert_with_notebook_01,
    machine,
    machine_line,
    markdown_table,
    prepare_model,
    target,
    targets_table,
)

import loadtest
from gateways import running_gateway
from servers import running_model_server

DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))
CLIENTS = (1, 2, 4, 8, 16, 32, 64)
RATE_FACTORS = (0.5, 1, 2, 3)
# Five rounds: on this shared 2-core machine one row's runs spread by 15 % and more; the median of five holds better.
FULL = {"seconds": 8, "rounds": 5, "warmup": 8, "sweep_seconds": 12}
QUICK = {"seconds": 3, "rounds": 1, "warmup": 2, "sweep_seconds": 3}
# Other admission settings tried with --sweep: (GATEWAY_MAX_INFLIGHT, GATEWAY_QUEUE_BUDGET).
SWEEP = ((2, 1.0), (8, 1.0), (4, 0.25), (4, 0.5), (4, 2.0))


def xception_size_model(work: Path) -> tuple[Path, str]:
    """A model of Xception's size with random weights (tests/standin.py), converted by notebook 01 like the
    course model (both signatures), in a TF Serving base folder."""
    base = convert_with_notebook_01(work / "xception", "save_xception_size_h5")
    return base, "Xception's size with random weights (tests/standin.py build_xception_size): the course model's cost"


def serve_defaults() -> dict:
    """What gunicorn.conf.py and the gateway's Settings use when nothing is set: the `make serve` gateway."""
    saved = os.environ.copy()
    try:
        for name in [name for name in os.environ if name.startswith("GATEWAY_")]:
            del os.environ[name]
        conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    from gateway_parts.settings import Settings

    settings = Settings()
    return {
        "workers": conf["workers"],
        "max_inflight": settings.max_inflight,
        "queue_budget": settings.queue_budget,
    }


def cpu_seconds(process) -> float:
    """CPU time of a process and its children (gunicorn's master and workers)."""
    parent = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def cpu_now(stack: dict) -> dict:
    """CPU seconds so far of each part (the load generator: this process) and the monotonic time they were read."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    parts = {name: cpu_seconds(process) for name, process in stack["processes"].items()}
    return {**parts, "load generator": usage.ru_utime + usage.ru_stime, "at": time.monotonic()}


def measure(stack: dict, photos, seconds: float, *, clients: int = 0, rate: float = 0.0) -> dict:
    """One run of a row: a closed loop of `clients`, or an open loop at `rate`, for `seconds`; with the CPU each
    part used and the successful requests' latencies and gateway timings, for combine()."""
    started = time.monotonic()
    before = cpu_now(stack)
    # The CPU each part used is read again when the window closes, not when the run returns: after the window the
    # run waits for its last answers (up to a budget for held refusals) while the machine idles, which would
    # dilute the row's figures.
    after: dict = {}
    window = threading.Timer(seconds, lambda: after.update(cpu_now(stack)))
    window.start()
    summary = loadtest.run(
        stack["url"],
        photos,
        10**9,
        clients or 1,
        rate=rate or None,
        duration=seconds,
        max_outstanding=1024,
        seed=clients or 7,
        detail=True,
    )
    window.join()
    elapsed = after["at"] - before["at"]
    cores = {name: (after[name] - before[name]) / elapsed for name in before if name != "at"}
    finished = [o for o in summary.outcomes if o.finished <= started + seconds]
    d = summary.as_dict()
    return {
        "mode": "closed" if clients else "open",
        "clients": clients,
        "rate": rate,
        "cores": cores,
        "goodput": sum(o.status == 200 for o in finished) / seconds,
        "sent": d["sent"],
        "shed": d["shed"],
        "no_answer": d["no_answer"],
        "other_errors": d["sent"] - d["ok"] - d["shed"] - d["no_answer"],
        "errors": d["errors"],
        "latencies": [o.seconds for o in summary.ok],
        "queue_ms": [o.queue_ms for o in summary.ok if o.queue_ms is not None],
        "service_ms": [o.service_ms for o in summary.ok if o.service_ms is not None],
    }


def combine(runs: list[dict]) -> dict:
    """A row from its runs (one per round): the median goodput, counts summed, percentiles over every request."""
    latencies = [x for run in runs for x in run["latencies"]]
    queue = [x for run in runs for x in run["queue_ms"]]
    service = [x for run in runs for x in run["service_ms"]]
    sent = sum(run["sent"] for run in runs)
    goodputs = [run["goodput"] for run in runs]
    return {
        "mode": runs[0]["mode"],
        "clients": runs[0]["clients"],
        "rate": runs[0]["rate"],
        "goodput": statistics.median(goodputs),
        "goodput_runs": goodputs,
        "sent": sent,
        "shed_share": sum(run["shed"] for run in runs) / sent if sent else 0.0,
        "no_answer": sum(run["no_answer"] for run in runs),
        "other_errors": sum(run["other_errors"] for run in runs),
        "p50_ms": loadtest.percentile(latencies, 50) * 1000,
        "p99_ms": loadtest.percentile(latencies, 99) * 1000,
        "server_ms": {
            "queue_p99": loadtest.percentile(queue, 99),
            "queue_max": max(queue, default=0.0),
            "service_p99": loadtest.percentile(service, 99),
        },
        "cores": {part: statistics.mean(run["cores"][part] for run in runs) for part in runs[0]["cores"]},
        "errors": dict(sum((collections.Counter(run["errors"]) for run in runs), collections.Counter())),
    }


def describe(row: dict) -> str:
    if row["mode"] == "closed":
        return f"closed loop, {row['clients']} client{'s' if row['clients'] > 1 else ''}"
    return f"open loop, {row['factor']:g}x capacity ({row['rate']:.0f}/s)"


def run_rows(stack: dict, photos, options: dict) -> tuple[list[dict], float]:
    """Every row, `rounds` times over, the rows interleaved: on a shared machine the background load drifts,
    and a row measured once, minutes apart from the row it is compared with, would compare the drift too. The
    open-loop rates are set by the first round's capacity (its best closed-loop goodput)."""
    loads = [{"clients": clients} for clients in CLIENTS]
    runs: dict[int, list[dict]] = {}
    capacity = 0.0
    for round_ in range(options["rounds"]):
        if round_ == 0:
            for index, load in enumerate(loads):
                runs[index] = [measure(stack, photos, options["seconds"], **load)]
            capacity = max(run[0]["goodput"] for run in runs.values())
            loads += [{"rate": factor * capacity} for factor in RATE_FACTORS]
            first = len(CLIENTS)
        else:
            first = 0
        for index in range(first, len(loads)):
            runs.setdefault(index, []).append(measure(stack, photos, options["seconds"], **loads[index]))
        print(f"  round {round_ + 1} of {options['rounds']} done", flush=True)
    rows = [combine(runs[index]) for index in range(len(loads))]
    for row, factor in zip(rows[len(CLIENTS) :], RATE_FACTORS, strict=True):
        row["factor"] = factor
    for row in rows:
        runs = ", ".join(f"{g:.1f}" for g in row["goodput_runs"])
        print(f"  {describe(row)}: {row['goodput']:.1f}/s (runs {runs}), p99 {row['p99_ms']:.0f} ms")
    return rows, max(row["goodput"] for row in rows[: len(CLIENTS)])


@contextlib.contextmanager
def gateway_on(model, work: Path, defaults: dict, **env: str):
    """The gateway in front of `model`; yields what measure() needs: its URL and the processes to account."""
    with running_gateway(model.grpc_target, work, workers=defaults["workers"], **env) as gw:
        yield {"url": gw.url, "processes": {"gateway": gw.process, "model server": model.process}}


def targets_of(rows: list[dict], best: float, budget_ms: float) -> list[dict]:
    no_answer = sum(row["no_answer"] for row in rows)
    at_64 = next(row for row in rows if row["mode"] == "closed" and row["clients"] == 64)
    at_3x = next(row for row in rows if row["mode"] == "open" and row["factor"] == 3)
    overload = [row for row in rows if row["shed_share"] > 0 or row.get("factor", 0) > 1]
    worst = max(overload, key=lambda row: row["p99_ms"]) if overload else None
    targets = [
        # A count that must be zero has no ratio to it: measured ÷ 0 is left out.
        {**target("requests with no HTTP answer, every row", no_answer, "requests", 1, at_most=True), "ratio": None}
        | {"target": "= 0 requests", "met": no_answer == 0},
        target("goodput at 64 clients ÷ best goodput", at_64["goodput"] / best, "", 0.9, at_most=False),
        target("goodput at 3x capacity ÷ best goodput", at_3x["goodput"] / best, "", 0.9, at_most=False),
    ]
    if worst:
        # One service time: the row's p99 of the time the gateway worked on a request (its timings, total minus
        # the wait for a slot), the part of a latency the admission budget does not bound.
        service = worst["server_ms"]["service_p99"]
        name = f"p99 of successful requests under overload (worst row: {describe(worst)}; service p99 {service:.0f} ms)"
        targets.append(target(name, worst["p99_ms"], "ms", budget_ms + service, at_most=True))
        waited = max(row["server_ms"].get("queue_max", 0.0) for row in overload)
        name = "longest wait for a slot of a served request, overload rows"
        targets.append(target(name, waited, "ms", budget_ms, at_most=True))
    return targets


def plot(rows: list[dict], capacity: float, budget_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [row for row in rows if row["mode"] == "closed"]
    opened = [row for row in rows if row["mode"] == "open"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, part, xs, label in (
        (left, closed, [row["clients"] for row in closed], "clients (closed loop, no Retry-After)"),
        (right, opened, [row["rate"] for row in opened], "offered requests/s (open loop, Poisson)"),
    ):
        axis.plot(xs, [row["goodput"] for row in part], "o-", color="tab:blue", label="goodput (200/s)")
        axis.axhline(capacity, color="tab:blue", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
        latency = axis.twinx()
        latency.plot(xs, [row["p99_ms"] for row in part], "s--", color="tab:red", label="p99 of 200s (ms)")
        latency.axhline(budget_ms, color="tab:red", linestyle=":", linewidth=1)
        latency.set_ylim(0, max(max(row["p99_ms"] for row in rows) * 1.15, budget_ms * 1.5))
        latency.set_ylabel("p99 ms", color="tab:red")
        shed = [100 * row["shed_share"] for row in part]
        for x, y, share in zip(xs, [row["goodput"] for row in part], shed, strict=True):
            if share:
                axis.annotate(f"{share:.0f}% shed", (x, y), textcoords="offset points", xytext=(0, -14), fontsize=8)
    left.set_xscale("log", base=2)
    left.set_xticks(list(CLIENTS), [str(c) for c in CLIENTS])
    left.set_ylabel("goodput, successful requests/s")
    left.set_ylim(0, capacity * 1.25)
    left.set_title("closed loop")
    right.set_title(f"open loop (capacity {capacity:.0f}/s = best closed-loop goodput)")
    figure.suptitle(
        "Gateway on `make serve` defaults: goodput (blue; dotted: capacity) and p99 of the answered requests "
        "(red; dotted: queue budget)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep(model, photos, work: Path, defaults: dict, capacity: float, seconds: float) -> list[dict]:
    """The two overload rows (64 clients, 3x capacity) for other admission settings, beside the defaults'."""
    results = []
    for inflight, budget in ((defaults["max_inflight"], defaults["queue_budget"]), *SWEEP):
        env = {"GATEWAY_MAX_INFLIGHT": str(inflight), "GATEWAY_QUEUE_BUDGET": str(budget)}
        with gateway_on(model, work, defaults, **env) as stack:
            measure(stack, photos, seconds / 2, clients=8)  # warm-up
            best = combine([measure(stack, photos, seconds, clients=16)])
            at_64 = combine([measure(stack, photos, seconds, clients=64)])
            at_3x = combine([measure(stack, photos, seconds, rate=3 * capacity)])
        results.append({"max_inflight": inflight, "queue_budget": budget, "16": best, "64": at_64, "3x": at_3x})
        print(
            f"  inflight {inflight}, budget {budget:g} s: 16 clients {best['goodput']:.1f}/s, 64 clients "
            f"{at_64['goodput']:.1f}/s (p99 {at_64['p99_ms']:.0f} ms), 3x {at_3x['goodput']:.1f}/s "
            f"(p99 {at_3x['p99_ms']:.0f} ms)",
            flush=True,
        )
    return results


def report(results: dict, image: str) -> str:
    d = results["defaults"]
    rows = [
        [
            describe(row),
            f"{row['goodput']:.1f}",
            f"{100 * row['shed_share']:.0f}%",
            row["no_answer"],
            row["other_errors"],
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['server_ms'].get('queue_p99', 0):.0f}",
            f"{row['server_ms'].get('service_p99', 0):.0f}",
            " / ".join(f"{row['cores'][part]:.2f}" for part in ("gateway", "model server", "load generator")),
        ]
        for row in results["rows"]
    ]
    lines = [
        "# Load: the gateway from light load to 3x capacity",
        "",
        f"Machine: {machine_line(results['machine'])}. Mode: {results['mode']}, "
        f"{results['rounds']} rounds of {results['seconds']} s per row, the rows interleaved; goodput is the median of "
        "the rounds, percentiles are over every request of a row.",
        f"Model: {results['model']}. Gateway: `make serve` defaults, {d['workers']} uvicorn workers under gunicorn, "
        f"GATEWAY_MAX_INFLIGHT={d['max_inflight']} per worker, GATEWAY_QUEUE_BUDGET={d['queue_budget']:g} s. "
        "The load generator (loadtest.py, dataset photo uploads) runs on the same cores.",
        "",
        f'Capacity (best closed-loop goodput): **{results["capacity"]:.1f} requests/s**. "waited" and "worked" are '
        "the gateway's own timings of the successful requests (?detail=1): the wait for an admission slot, then the "
        "work. CPU is cores used by each part during the row's measured window (2 cores in all).",
        "",
        markdown_table(
            [
                "load",
                "goodput /s",
                "shed",
                "no answer",
                "other errors",
                "p50 ms",
                "p99 ms",
                "waited p99 ms",
                "worked p99 ms",
                "CPU: gateway / model / generator",
            ],
            rows,
        ),
        "",
        f"![goodput and p99 against offered load]({image})",
        "",
        "## Targets",
        "",
        targets_table(results["targets"]),
    ]
    if results.get("sweep"):
        lines += [
            "",
            "## Admission settings tried (`--sweep`)",
            "",
            markdown_table(
                ["inflight", "budget s", "16 clients /s", "64 clients /s", "64: p99 ms", "3x /s", "3x: p99 ms"],
                [
                    [
                        s["max_inflight"],
                        f"{s['queue_budget']:g}",
                        f"{s['16']['goodput']:.1f}",
                        f"{s['64']['goodput']:.1f}",
                        f"{s['64']['p99_ms']:.0f}",
                        f"{s['3x']['goodput']:.1f}",
                        f"{s['3x']['p99_ms']:.0f}",
                    ]
                    for s in results["sweep"]
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per row (a smoke run, not numbers)")
    parser.add_argument("--sweep", action="store_true", help="also the overload rows for other admission settings")
    parser.add_argument(
        "--model",
        choices=["auto", "xception-size"],
        default="auto",
        help="auto: models/clothing-model after `make model`, else the stand-in; xception-size: Xception's size and "
        "cost per image with random weights (writes load-xception.md/json/png)",
    )
    args = parser.parse_args()
    options = QUICK if args.quick else FULL
    photos = loadtest.pick_photos(DATASET, 200)
    defaults = serve_defaults()
    results = {
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        "seconds": options["seconds"],
        "rounds": options["rounds"],
    }
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        if args.model == "xception-size":
            model_base, results["model"] = xception_size_model(work)
        else:
            model_base, results["model"] = prepare_model(work)
        with running_model_server(model_base, rest_api_port=0) as model:
            with gateway_on(model, work, defaults) as stack:
                print(f"warming up, then {len(CLIENTS)} closed-loop and {len(RATE_FACTORS)} open-loop rows", flush=True)
                measure(stack, photos, options["warmup"], clients=8)
                rows, capacity = run_rows(stack, photos, options)
            if args.sweep:
                print("admission settings sweep", flush=True)
                results["sweep"] = sweep(model, photos, work, defaults, capacity, options["sweep_seconds"])
    budget_ms = defaults["queue_budget"] * 1000
    results.update(
        defaults=defaults,
        rows=rows,
        capacity=capacity,
        targets=targets_of(rows, capacity, budget_ms),
    )
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = "load" if args.model == "auto" else "load-xception"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    plot(rows, capacity, budget_ms, OUTPUT / f"{stem}.png")
    (OUTPUT / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results, f"{stem}.png")
    (OUTPUT / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {OUTPUT / stem}.md, {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
