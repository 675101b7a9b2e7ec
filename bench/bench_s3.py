"""Artifact throughput to an S3 server: our runtime's signed-URL transfers vs boto3's upload_file/download_file.

    .venv/bin/python bench/bench_s3.py [--iterations 5] [--sizes 4,128]

The peer is what ``aws s3 cp`` does (boto3's managed transfer: 8 MiB parts, 10 threads). Ours is what a
step does with an ``s3://`` artifact root: the worker signs (a POST policy, a multipart upload and its part
URLs: ``transfer.attach``, timed with the upload), then the stdlib runtime streams the file through urllib
(one POST below the multipart threshold, else sequential parts); a download is one signed GET.

The server is moto's S3 app in its own process on loopback (so it does not share the client's GIL), the
same app the tests use, without their presigned-URL checks (those cost the server, not the client). Sides
alternate and the order flips every iteration. Prints medians and min-max in MiB/s and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from airflow_remote_ml import runtime
from airflow_remote_ml.core import transfer

BUCKET = "bench-artifacts"
SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def ours_upload(path: str, key: str, settings: transfer.TransferSettings) -> float:
    started = time.perf_counter()
    config = {"outputs": {"blob": f"s3://{BUCKET}/{key}"}, "timeout": 600}
    transfer.attach(config, {}, settings=settings)
    runtime._set_transfers(config)
    runtime._upload("blob", config["outputs"]["blob"], path)
    return time.perf_counter() - started


def ours_download(key: str, target: str) -> float:
    started = time.perf_counter()
    config = {"inputs": {"blob": f"s3://{BUCKET}/{key}"}, "timeout": 600}
    transfer.attach(config, {})
    runtime._download_signed(config["transfers"]["inputs"]["blob"], target, "bench")
    return time.perf_counter() - started


def boto_upload(client: object, path: str, key: str) -> float:
    started = time.perf_counter()
    client.upload_file(path, BUCKET, key)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def boto_download(client: object, key: str, target: str) -> float:
    started = time.perf_counter()
    client.download_file(BUCKET, key, target)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def fmt(size: int, times: list[float]) -> str:
    rates = sorted(size / (1 << 20) / t for t in times)
    return f"{statistics.median(rates):.0f} ({rates[0]:.0f}–{rates[-1]:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--sizes", default="4,128", help="file sizes in MiB, comma-separated")
    args = parser.parse_args()
    proc, endpoint = start_server()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": endpoint})
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    settings = transfer.TransferSettings()  # the defaults: multipart from 64 MiB, 8 part URLs
    tmp = tempfile.mkdtemp(prefix="bench-s3-")
    rows = []
    try:
        for mib in (int(s) for s in args.sizes.split(",")):
            size = mib << 20
            path = os.path.join(tmp, f"blob-{mib}")
            with open(path, "wb") as fh:
                for _ in range(mib):
                    fh.write(os.urandom(1 << 20))
            times: dict[str, list[float]] = {"ours-up": [], "boto-up": [], "ours-down": [], "boto-down": []}
            # One untimed round per side first: each side's client (the worker's boto3 client that signs, and
            # boto3's own) is made once per process, as on a worker that runs many steps.
            ours_upload(path, "warm/ours", settings)
            boto_upload(client, path, "warm/boto")
            for i in range(args.iterations):
                sides = ["ours", "boto"] if i % 2 == 0 else ["boto", "ours"]
                for side in sides:
                    key = f"{side}/{mib}/{i}"
                    if side == "ours":
                        times["ours-up"].append(ours_upload(path, key, settings))
                        times["ours-down"].append(ours_download(key, os.path.join(tmp, "down")))
                    else:
                        times["boto-up"].append(boto_upload(client, path, key))
                        times["boto-down"].append(boto_download(client, key, os.path.join(tmp, "down")))
                    os.remove(os.path.join(tmp, "down"))
                    client.delete_object(Bucket=BUCKET, Key=key)
            for way in ("up", "down"):
                ours_rate = statistics.median(size / t for t in times[f"ours-{way}"])
                boto_rate = statistics.median(size / t for t in times[f"boto-{way}"])
                rows.append((f"{mib} MiB {'upload' if way == 'up' else 'download'}", fmt(size, times[f"ours-{way}"]),
                             fmt(size, times[f"boto-{way}"]), f"{ours_rate / boto_rate:.2f}×"))
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    print(f"\nbench_s3: {args.iterations} iterations per side, alternating; load average {os.getloadavg()}")
    print(f"command: .venv/bin/python bench/bench_s3.py --iterations {args.iterations} --sizes {args.sizes}\n")
    print("| transfer | ours (signed URLs, stdlib runtime), MiB/s median (min–max) | boto3 upload_file/download_file, "
          "MiB/s median (min–max) | ours ÷ boto3 (throughput; higher is better for us) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
