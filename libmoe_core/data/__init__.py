"""Data pipeline: LLaVA-format records, validation, conversation templates, dataset and
collator, modality-grouped sampler, the embedded easyvqa dataset and dataset manifests.

Submodules are imported lazily by name (``from libmoe_core.data.collator import VLMCollator``);
the names below are re-exported for convenience.
"""

from .records import Problem, Record, read_records, write_records
from .templates import ConversationTemplate, available_templates, get_template
from .validate import DataValidationError, Report, apply_policy, check_file, check_records

__all__ = [
    "ConversationTemplate", "DataValidationError", "LLaVADataset", "ModalityLengthGroupedSampler", "Problem",
    "Record", "Report", "VLMCollator", "apply_policy", "available_templates", "build_easyvqa", "check_file",
    "check_records", "get_template", "read_records", "write_records",
]


def __getattr__(name):  # torch-using modules load on first use
    if name == "LLaVADataset":
        from .dataset import LLaVADataset
        return LLaVADataset
    if name == "VLMCollator":
        from .collator import VLMCollator
        return VLMCollator
    if name == "ModalityLengthGroupedSampler":
        from .sampler import ModalityLengthGroupedSampler
        return ModalityLengthGroupedSampler
    if name == "build_easyvqa":
        from .easyvqa import build_easyvqa
        return build_easyvqa
    raise AttributeError(name)
