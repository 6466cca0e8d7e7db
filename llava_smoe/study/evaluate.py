"""`python -m llava_smoe.study.evaluate CKPT DATA IMAGES OUT.json [BATCH]`: a cell's exact-match
accuracy, with the image and blind, written to OUT.json (a study runs it in its own process)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    checkpoint, data, images, out = argv[:4]
    batch_size = int(argv[4]) if len(argv) > 4 else 32
    import torch

    from llava_smoe.evaluation.exact_match import evaluate_exact_match
    from llava_smoe.pretrained import load_pretrained

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, processor = load_pretrained(checkpoint)
    records = json.loads(Path(data).read_text())
    seen = evaluate_exact_match(model, processor, records, images, batch_size=batch_size)
    blind = evaluate_exact_match(model, processor, records, images, blind=True, batch_size=batch_size)
    result = {"accuracy": seen.accuracy, "blind_accuracy": blind.accuracy, "num_questions": seen.num_questions,
              "accuracy_by_type": seen.per_type, "blind_accuracy_by_type": blind.per_type,
              "count_by_type": seen.per_type_count}
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
