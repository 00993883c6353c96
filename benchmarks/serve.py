"""``fastflow serve`` under load, with bad uploads mixed in: throughput, latency, memory, parity.

    python benchmarks/serve.py RUN --images "bottle/test/*/*.png" --clients 1 4 16 --requests 200
    python benchmarks/serve.py RUN --images "bottle/test/*/*.png" --parity            # also: served == fastflow predict
    python benchmarks/serve.py RUN --images "bottle/test/*/*.png" --parity onnx auto  # predict with each engine

Starts ``python -m fastflow serve RUN`` in a child process on a free 127.0.0.1 port (loopback
only), waits for ``/health`` and scores every image once, alone (the reference). Then for each
client count it sends ``--requests`` requests from that many threads (one httpx client each):
good uploads cycle through the images, and ``--bad-fraction`` of the requests, spread over the
run, are the bad uploads of ``tests/support.py``'s ``bad_requests`` (not an image, truncated PNG,
zero bytes, a decompression bomb header, a body over ``--max-body-mb``, wrong content types, a GIF,
multipart without a file, a bad query flag). A good request fails when it is not answered 200 or
its score differs from the reference by more than 1e-5 (batched with others, an image must
score as it does alone); a bad one fails when it is not answered with a 4xx. The server's
resident set (``VmRSS`` of ``/proc/PID/status``) is read after the reference pass and after each
level. Prints the CPU, the command and a markdown table (``--table-json PATH`` also writes it as a
results-table JSON, ``docs/render.py``); exits 1 when a good request failed, a
bad one got no 4xx, the server died, a level ran past ``--time-limit`` or the RSS grew by more
than ``--max-rss-growth-mb`` over the warm start. Throughput is good images answered 200 per
second of the level's wall time (bad requests included). The default bound, 800 MiB, is the
measured working set of batches of 16 (ONNX Runtime keeps its arena: Lite0 at 256 px grew by
~630 MiB at 16 clients, then by a few MiB per repeated level; ~240 MiB with ``--max-batch 4``)
plus headroom: a leak shows as growth on repeated levels (``--clients 16 16 16``).

``--parity`` also runs ``python -m fastflow predict RUN IMAGES`` (with the server's engine, or
with each engine named, ``auto`` for predict's own choice) and compares every image's reference
score and label with ``predictions.json`` (1e-5).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import bad_requests

from fastflow.apps.prediction_files import expand_inputs
from fastflow.apps.result_tables import (
    add_table_json_option,
    markdown_row,
    markdown_table,
    table_record,
    write_table,
)
from fastflow.core.hardware import cpu_model

TOLERANCE = 1e-5


@dataclass
class Outcome:
    """One request: ``kind`` is an image index (good) or a bad upload's name."""

    kind: int | str
    status: int | None  # None: no HTTP answer (connection error, timeout)
    seconds: float
    score: float | None = None
    error: str = ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The resident set of process ``pid`` in MiB (``VmRSS``); NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "fastflow",
        "serve",
        str(args.run),
        "--port",
        str(port),
        "--max-body-mb",
        str(args.max_body_mb),
        "--max-batch",
        str(args.max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
    ]
    if args.engine is not None:
        command += ["--engine", args.engine]
    with log.open("wb") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)


def wait_healthy(server: subprocess.Popen, base: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode} while starting:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    sys.exit(f"no healthy server after {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def send(
    client: httpx.Client, base: str, body: bytes, content_type: str, query: str, kind: int | str
) -> Outcome:
    start = time.perf_counter()
    try:
        response = client.post(f"{base}/predict{query}", content=body, headers={"content-type": content_type})
    except httpx.HTTPError as error:
        return Outcome(kind, None, time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    score = answer.get("score") if response.status_code == 200 else None
    return Outcome(kind, response.status_code, seconds, score, str(answer.get("error", ""))[:200])


def schedule(
    count: int, bad_fraction: float, n_images: int, bad_names: list[str], seed: int
) -> list[int | str]:
    """``count`` request kinds: round(count x bad_fraction) bad ones (cycling through the names) at
    random places, the others good (cycling through the images)."""
    n_bad = round(count * bad_fraction)
    places = set(random.Random(seed).sample(range(count), n_bad))
    bad, good = itertools.cycle(bad_names), itertools.cycle(range(n_images))
    return [next(bad) if i in places else next(good) for i in range(count)]


def run_level(
    base: str,
    clients: int,
    kinds: list[int | str],
    images: list[bytes],
    bad: dict[str, tuple[bytes, str, str, int, str]],
    timeout: float,
    deadline: float,
) -> tuple[list[Outcome], float]:
    """Send ``kinds`` from ``clients`` threads; returns the outcomes and the wall time. Requests not
    started by ``deadline`` are not sent."""
    pending = iter(enumerate(kinds))
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * len(kinds)

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            while time.monotonic() < deadline:
                with lock:
                    index, kind = next(pending, (None, None))
                if index is None:
                    return
                if isinstance(kind, int):
                    outcomes[index] = send(client, base, images[kind], "image/png", "", kind)
                else:
                    body, content_type, query, _, _ = bad[kind]
                    outcomes[index] = send(client, base, body, content_type, query, kind)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None], time.perf_counter() - start


def parity(
    args: argparse.Namespace, paths: list[Path], reference: list[dict], engine: str
) -> tuple[float, int, int]:
    """Every image's served (alone) score and label against ``fastflow predict``'s with ``engine``
    (``auto``: predict's own choice): (max abs score difference, label mismatches, images compared)."""
    with tempfile.TemporaryDirectory() as output:
        command = [
            sys.executable,
            "-m",
            "fastflow",
            "predict",
            str(args.run),
            *map(str, paths),
            "--output",
            output,
        ]
        command += [] if engine == "auto" else ["--engine", engine]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"fastflow predict failed:\n{done.stderr[-2000:]}")
        rows = {
            str(Path(row["path"]).resolve()): row
            for row in json.loads((Path(output) / "predictions.json").read_text())["predictions"]
        }
    worst, labels = 0.0, 0
    for path, served in zip(paths, reference):
        row = rows[str(path.resolve())]
        worst = max(worst, abs(served["score"] - row["score"]))
        labels += served["label"] != row["label"]
    return worst, labels, len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run folder, model.safetensors or fastflow export folder")
    parser.add_argument("--images", nargs="+", required=True, help="image files, folders or globs (PNG/JPEG)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level"
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per level, good and bad")
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=4.0,
        help="the server's body limit (the oversized upload is one byte over it)",
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--engine", default=None, help="the server's --engine (default: its own choice)")
    parser.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=800.0,
        help="fail when the server's RSS grows by more than this over the warm start",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--time-limit", type=float, default=1800.0, help="seconds per level; later requests are not sent"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--parity",
        nargs="*",
        metavar="ENGINE",
        default=None,
        help="also compare with fastflow predict: with the server's engine, or with each one named "
        "(torch, onnx, openvino, auto = predict's choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_table_json_option(parser)
    args = parser.parse_args()
    if not 0 <= args.bad_fraction <= 1 or args.requests < 1 or min(args.clients) < 1:
        parser.error("--bad-fraction must be in [0, 1], --requests and --clients at least 1")

    print(
        f"CPU: {cpu_model()}; {os.cpu_count()} logical cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    print(f"command: python {shlex.join(sys.argv)}")
    paths = expand_inputs(args.images)
    images = [path.read_bytes() for path in paths]
    bad = bad_requests(images[0], round(args.max_body_mb * 2**20))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "server.log"
        server = start_server(args, port, log)
        try:
            wait_healthy(server, base, args.startup_timeout, log)
            model = httpx.get(f"{base}/model", timeout=10).json()
            ready = rss_mb(server.pid)
            reference: list[dict] = []
            with httpx.Client(timeout=args.timeout) as client:
                for path, body in zip(paths, images):
                    response = client.post(
                        f"{base}/predict", content=body, headers={"content-type": "image/png"}
                    )
                    if response.status_code != 200:
                        sys.exit(
                            f"the reference call for {path} got {response.status_code}: {response.text[:300]}"
                        )
                    reference.append(response.json())
            warm = rss_mb(server.pid)
            print(
                f"model: {model['name']} ({model['engine']}, {model['precision']}, input "
                f"{model['config']['input_size'] if model.get('config') else '?'}); {len(paths)} images, "
                f"{len(bad)} kinds of bad upload, bad fraction {args.bad_fraction:.0%}; max batch "
                f"{args.max_batch}, batch wait {args.batch_wait_ms} ms; server RSS {ready:.0f} MiB ready, "
                f"{warm:.0f} MiB after the {len(paths)} reference calls"
            )

            rows: list[list[str]] = []
            for clients in args.clients:
                kinds = schedule(args.requests, args.bad_fraction, len(paths), list(bad), args.seed + clients)
                outcomes, wall = run_level(
                    base, clients, kinds, images, bad, args.timeout, time.monotonic() + args.time_limit
                )
                good = [o for o in outcomes if isinstance(o.kind, int)]
                wrong = [
                    o
                    for o in good
                    if o.status != 200
                    or o.score is None
                    or abs(o.score - reference[o.kind]["score"]) > TOLERANCE
                ]
                not_4xx = [
                    o
                    for o in outcomes
                    if isinstance(o.kind, str) and not (o.status and 400 <= o.status < 500)
                ]
                worst = max(
                    (abs(o.score - reference[o.kind]["score"]) for o in good if o.score is not None),
                    default=0.0,
                )
                latency = np.array([o.seconds for o in good]) * 1000
                rss = rss_mb(server.pid)
                alive = server.poll() is None
                if alive:
                    try:
                        alive = httpx.get(f"{base}/health", timeout=30).status_code == 200
                    except httpx.HTTPError:
                        alive = False
                served = sum(o.status == 200 for o in good)
                rows.append(
                    [
                        f"{clients}",
                        f"{len(outcomes)}",
                        f"{len(good)}",
                        f"{served / wall:.2f}",
                        f"{np.percentile(latency, 50):.0f}",
                        f"{np.percentile(latency, 99):.0f}",
                        f"{len(wrong)}",
                        f"{worst:.1e}",
                        f"{len(outcomes) - len(good)}",
                        f"{len(not_4xx)}",
                        f"{rss:.0f}",
                        f"{rss - warm:+.0f}",
                        "yes" if alive else "NO",
                    ]
                )
                print(markdown_row(rows[-1]).replace("|", " ").strip(), flush=True)
                for o in (wrong + not_4xx)[:5]:
                    print(f"  failed: {o.kind!r} -> {o.status} {o.error or o.score}")
                if wrong:
                    failures.append(f"{clients} clients: {len(wrong)} good requests failed")
                if not_4xx:
                    failures.append(f"{clients} clients: {len(not_4xx)} bad requests not answered with a 4xx")
                if len(outcomes) < len(kinds):
                    failures.append(
                        f"{clients} clients: only {len(outcomes)} of {len(kinds)} requests sent "
                        f"within --time-limit {args.time_limit:.0f} s"
                    )
                if not rss - warm <= args.max_rss_growth_mb:
                    failures.append(
                        f"{clients} clients: server RSS grew by {rss - warm:.0f} MiB "
                        f"(bound {args.max_rss_growth_mb:.0f})"
                    )
                if not alive:
                    failures.append(f"{clients} clients: the server died or is unhealthy")
                    break

            columns = [
                "clients",
                "requests",
                "good",
                "good images/s",
                "p50 ms",
                "p99 ms",
                "good failed",
                "max score diff",
                "bad",
                "bad not 4xx",
                "server RSS MiB",
                "RSS growth",
                "alive",
            ]
            print("\n" + markdown_table(columns, rows))
            if args.table_json:
                title = (
                    f"fastflow serve under load: {model['name']} ({model['engine']}, {model['precision']})"
                )
                notes = (
                    f"{len(paths)} images, bad fraction {args.bad_fraction:.0%}, max batch {args.max_batch}, "
                    f"batch wait {args.batch_wait_ms} ms; server RSS {ready:.0f} MiB ready, {warm:.0f} MiB "
                    f"after the {len(paths)} reference calls; OMP_NUM_THREADS="
                    f"{os.environ.get('OMP_NUM_THREADS', '-')}."
                )
                write_table(args.table_json, table_record(title, columns, rows, notes=notes))
            if args.parity is not None:
                print()
            for engine in (args.parity or [model["engine"]]) if args.parity is not None else []:
                worst, labels, compared = parity(args, paths, reference, engine)
                shown = "(its own engine choice)" if engine == "auto" else f"--engine {engine}"
                print(
                    f"parity of the served scores ({model['engine']}) with fastflow predict {shown} on {compared} "
                    f"images: max abs score difference {worst:.2e}, {labels} label mismatches"
                )
                if worst > TOLERANCE or labels or compared != len(paths):
                    failures.append(
                        f"parity with predict {shown}: max difference {worst:.2e}, {labels} label mismatches"
                    )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    print("\nPASS" if not failures else "\nFAIL: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
