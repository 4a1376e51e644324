"""One fresh process of tests/gpu/test_compile_cache.py: the project's compiled packed TTA pass
(``predict.tta_logits`` with ``InferSettings.compile`` and ``compile_cache``) on a tiny Gemma-2, on
CPU (only the "is the model on CUDA" test is answered yes). Prints a JSON line: the compile-cache
record, Inductor's FX-graph cache hits/misses, and the logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    store, rank = sys.argv[1], int(sys.argv[2])
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from torch._dynamo.utils import counters

    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu import packing, predict
    from tests.gpu.test_fast import _tiny

    df, tok, model = _tiny(12)
    packing.register_attention()
    model.config._attn_implementation = packing.ATTN_NAME
    predict._use_fast = lambda m: True  # the packed, compiled GPU path, run on CPU

    class Fmt:
        prompt_max_tokens = 12

    infer = InferSettings(max_length=96, tta=True, slab_tokens=512, compile=True, compile_cache=store)
    z = predict.tta_logits(model, tok, df, Fmt, infer, rank=rank)
    print(json.dumps({"record": model.arena_record if hasattr(model, "arena_record") else {},
                      "inductor": dict(counters["inductor"]), "logits": z.tolist()}))


if __name__ == "__main__":
    main()
