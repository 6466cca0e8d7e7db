"""`python -m llava_smoe.study.synth CONFIG_JSON OUT_DIR`: a study's shared data stage (the
shapes world of one seed), written to a temporary folder and renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from llava_smoe.data.synth import generate_shapes_world, parse_world

    config = parse_world(json.loads(argv[0]), ("synth",))
    out = Path(argv[1])
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_shapes_world(config, str(tmp))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
