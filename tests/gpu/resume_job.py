"""A teacher training run in its own process, slowed down so a test can kill it mid-way.

Usage: python resume_job.py '<json: base, train, valid, out, ckpt, slow_s>'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import FMT, RESUME_TEACHER

from arena_assets.gpu import data as gdata
from arena_assets.gpu.train import train_teacher

args = json.loads(sys.argv[1])
if args.get("slow_s"):
    orig = gdata.PadCollator.__call__

    def slow(self, items):  # type: ignore[no-untyped-def]
        time.sleep(args["slow_s"])
        return orig(self, items)

    gdata.PadCollator.__call__ = slow
train_teacher(args["base"], RESUME_TEACHER, FMT, args["train"], args["valid"], None, out_dir=args["out"], checkpoint_dir=args["ckpt"])
