"""LLaVA conversation data: records, the dataset, batching, sampling and the shapes world."""

from llava_smoe.data.collate import DataCollator
from llava_smoe.data.dataset import DataConfig, LlavaDataset, SkippedSample
from llava_smoe.data.records import (
    BAD_SAMPLE_POLICIES,
    REASONS,
    BadSampleError,
    JsonlRecords,
    RecordInfo,
    SkipStats,
    check_record,
    load_records,
)
from llava_smoe.data.sampler import ModalityLengthGroupedSampler
from llava_smoe.data.synth import ShapesWorldConfig, generate_shapes_world

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "REASONS",
    "BadSampleError",
    "DataCollator",
    "DataConfig",
    "JsonlRecords",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "RecordInfo",
    "ShapesWorldConfig",
    "SkipStats",
    "SkippedSample",
    "check_record",
    "generate_shapes_world",
    "load_records",
]
