"""``python -m bench.plain_runner CHECKPOINT``: the plain diffusers loop, in a process of its own.

The limit easel is measured against: the same pipeline (``from_pretrained`` of the same
folder), the same decoded input image, parameters and seeds, called in a loop. It runs as a
separate process started like the worker (own session), so both sides get the same
treatment from the OS scheduler when other work shares the cores. Protocol: prints
``ready``; then for each stdin line (a JSON list of seeds) runs one call per seed and
prints the per-call seconds as a JSON list.
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    from bench.common import bench_image, load_plain_pipeline, plain_call, png_bytes
    from shared.images import decode_image
    from shared.settings import Settings

    pipe = load_plain_pipeline(argv[0])
    image = decode_image(png_bytes(bench_image()), Settings())  # the RGB image the worker decodes
    print("ready", flush=True)
    for line in sys.stdin:
        seeds = json.loads(line)
        times = []
        for s in seeds:
            t0 = time.perf_counter()
            plain_call(pipe, image, s)
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
