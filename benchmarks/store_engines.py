"""Which streaming engine the image store is built on: write and read speed of the three candidates.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_engines.py [--n 2000] [--root /tmp/engines]

Writes the same ``n`` samples (a ~20 KB JPEG as bytes, an int label, a file name) with MosaicML
Streaming (MDS), LitData and WebDataset, then reads them back in a seeded random order (what
selfsup's step-indexed data order needs: ``train.step_indices`` picks any index at any step) and,
for WebDataset, sequentially (it has no random access without ``wids``, which is not installed).
Prints samples/s for each. Data goes under ``--root`` (default ``/tmp``), never the worktree.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (110, 110, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    return [{"image": jpeg, "label": int(i % 10), "name": f"class{i % 10}/img{i:06d}.jpg"} for i in range(n)]


def bench_mds(root: Path, samples, order) -> dict:
    from selfsup.data.store import mds_engine  # the MDS modules without streaming/__init__ (see there)

    reader_from_json, MDSWriter = mds_engine()

    out = root / "mds"
    t0 = time.perf_counter()
    with MDSWriter(out=str(out), columns={"image": "bytes", "label": "int", "name": "str"}, hashes=["sha1"],
                   size_limit=1 << 26) as w:
        for s in samples:
            w.write(s)
    write = time.perf_counter() - t0
    shards = [reader_from_json(str(out), None, obj) for obj in json.loads((out / "index.json").read_text())["shards"]]
    starts = np.cumsum([0] + [s.samples for s in shards])
    t0 = time.perf_counter()
    for i in order:
        k = int(np.searchsorted(starts, i, side="right") - 1)
        sample = shards[k].decode_sample(shards[k].get_sample_data(int(i - starts[k])))
        assert sample["label"] == i % 10
    read = time.perf_counter() - t0
    return {"write_per_s": len(samples) / write, "random_read_per_s": len(order) / read}


def bench_litdata(root: Path, samples, order) -> dict:
    from litdata import StreamingDataset
    from litdata.streaming.writer import BinaryWriter

    out = root / "litdata"
    t0 = time.perf_counter()
    w = BinaryWriter(str(out), chunk_bytes="64MB")
    for i, s in enumerate(samples):
        w[i] = s
    w.done()
    w.merge()
    write = time.perf_counter() - t0
    ds = StreamingDataset(str(out))
    t0 = time.perf_counter()
    for i in order:
        assert ds[int(i)]["label"] == i % 10
    read = time.perf_counter() - t0
    return {"write_per_s": len(samples) / write, "random_read_per_s": len(order) / read}


def bench_webdataset(root: Path, samples, order) -> dict:
    import webdataset as wds

    out = root / "wds"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxsize=1 << 26, verbose=0) as w:
        for i, s in enumerate(samples):
            w.write({"__key__": f"{i:08d}", "jpg": s["image"], "cls": str(s["label"]).encode(), "txt": s["name"].encode()})
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False):
        n += 1
    read = time.perf_counter() - t0
    return {"write_per_s": len(samples) / write, "sequential_read_per_s": n / read, "random_read_per_s": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--root", default="/tmp/selfsup-store-engines")
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    samples = _samples(args.n)
    order = np.random.default_rng(1).permutation(args.n)
    for name, fn in (("mosaicml-streaming (MDS)", bench_mds), ("litdata", bench_litdata), ("webdataset", bench_webdataset)):
        try:
            res = fn(root, samples, order)
        except Exception as e:  # an engine that cannot do it is a result too
            res = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"engine": name, "n": args.n, **{k: (round(v) if isinstance(v, float) else v) for k, v in res.items()}}),
              flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
