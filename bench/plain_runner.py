"""``python -m bench.plain_runner CHECKPOINT [OPTIONS_JSON]``: the plain diffusers loop, in a process of its own.

The limit easel is measured against: the same pipeline (``from_pretrained`` of the same
folder), the same decoded input image, parameters and seeds, called in a loop. It runs as a
separate process started like the worker (own session), so both sides get the same
treatment from the OS scheduler when other work shares the cores. OPTIONS_JSON is
``Target.plain_options()`` (image size, stage parameters, dtype, device, compile, phases).
Protocol: prints ``ready``; then for each stdin line (a JSON list of seeds) runs one call per
seed and prints the per-call seconds as a JSON list. With ``phases``, each call's step
timestamps go to stderr's last line (``phases [...]``) when stdin closes.
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    from bench.common import IMAGE_PX, bench_image, load_plain_pipeline, plain_call, png_bytes
    from easel.shared.images import decode_image
    from easel.shared.settings import Settings

    opts = json.loads(argv[1]) if len(argv) > 1 else {}
    stage = opts.get("stage")
    pipe = load_plain_pipeline(argv[0], opts.get("dtype", "float32"), opts.get("device", "cpu"),
                               opts.get("compile_unet", False))
    image = decode_image(png_bytes(bench_image(opts.get("px", IMAGE_PX))), Settings())  # as the worker decodes it
    phases = [] if opts.get("phases") else None
    print("ready", flush=True)
    for line in sys.stdin:
        seeds = json.loads(line)
        times = []
        for s in seeds:
            t0 = time.perf_counter()
            plain_call(pipe, image, s, stage, phases)
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)
    if phases is not None:  # stdin closed: the phases of every call, on stderr's last line
        print("phases " + json.dumps(phases), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
