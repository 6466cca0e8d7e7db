"""LLaVA conversation data: records, the dataset, batching, sampling, packed text and the shapes world.

Names load on first use (`llava-smoe data --help` needs no torch).
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "DataCollator": "collate",
    "DataConfig": "dataset",
    "LlavaDataset": "dataset",
    "SkippedSample": "dataset",
    "BAD_SAMPLE_POLICIES": "records",
    "REASONS": "records",
    "BadSampleError": "records",
    "JsonlRecords": "records",
    "RecordInfo": "records",
    "SkipStats": "records",
    "check_record": "records",
    "load_records": "records",
    "ModalityLengthGroupedSampler": "sampler",
    "ShapesWorldConfig": "synth",
    "generate_shapes_world": "synth",
})
