"""Peak memory of one ``Segmenter.run`` on a large image, against the size of what it returns.

Run in a fresh process (``ru_maxrss`` is the process's peak): writes an N x N greyscale PNG,
segments it with k hypotheses and prints one JSON line: peak RSS, the bytes of the returned
arrays (masks, mean, confidence, consensus, probs), the RSS before the run (interpreter,
numpy, ONNX Runtime, plan) and the excess ``peak - result`` that issue #25 bounds by 0.5 GB.
``--images N`` runs a list of N images of that size instead (``Segmenter``'s ``max_batch``
bounds the hypotheses sampled at once).

    python benchmarks/memory_large_input.py --size 8000 --k 8 [--rgb] [--plan polyp] [--out FILE.json]
    python benchmarks/memory_large_input.py --size 128 --images 20 --k 16 --max-batch 64
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(size: int, k: int, steps: int, plan: str, rgb: bool = False, images: int = 1,
            max_batch: int | None = None) -> dict:
    import numpy as np
    from PIL import Image

    from msld_sdk import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.png"
        y, x = np.mgrid[0:size, 0:size // 8]     # a smooth picture, written in bands: no big array kept
        band = ((np.sin(x / 97.0) * 100 + 128) % 256).astype(np.uint8)
        im = Image.fromarray(np.stack([band, band[::-1], 255 - band], -1) if rgb else band)
        im.resize((size, size)).save(path)
        del y, x
        seg = Segmenter(plan, backend="onnxruntime", **({} if max_batch is None else {"max_batch": max_batch}))
        seg.run(np.zeros((128, 128, 3) if rgb else (128, 128), np.float32), k=1, steps=1, seed=0)   # warm the graphs
        before = _rss_now()
        t = time.perf_counter()
        rs = seg.run([path] * images if images > 1 else [path], k=k, steps=steps, seed=0)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = sum(a.nbytes for r in rs for a in (r.masks, r.mean, r.confidence, r.consensus, r.probs))
    return {"size": size, "rgb": rgb, "images": images, "k": k, "steps": steps, "plan": plan,
            "max_batch": seg.max_batch, "peak_rss_bytes": peak, "result_bytes": result,
            "rss_before_run_bytes": before, "excess_bytes": peak - result, "seconds": round(seconds, 1),
            "python": sys.version.split()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--plan", default="lidc")
    ap.add_argument("--rgb", action="store_true", help="a colour PNG (default: greyscale)")
    ap.add_argument("--images", type=int, default=1, help="run a list of this many such images")
    ap.add_argument("--max-batch", type=int, default=None, help="Segmenter's max_batch (default: its own)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    rep = measure(a.size, a.k, a.steps, a.plan, a.rgb, a.images, a.max_batch)
    line = json.dumps(rep)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
