"""Student initialisation by layer selection (as DistilBERT / "shrink and fine-tune" students): the
student keeps an evenly spaced subset of the teacher's decoder blocks, first and last included, and
every other tensor (embeddings, final norm, LM head, vision tower, projector) as the teacher has it.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from edge_mllm.errors import OptionError
from edge_mllm.model.mllm import MultimodalLM


def select_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher block indices, always keeping the first and the last."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise OptionError(f"a student needs 1 to {num_teacher_layers} layers (got {num_student_layers})")
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [round(i * step) for i in range(num_student_layers)]


def make_student(teacher: MultimodalLM, num_layers: int) -> MultimodalLM:
    """A deep copy of ``teacher`` whose LLM keeps ``num_layers`` of its blocks."""
    keep = select_layers(teacher.config.text.num_hidden_layers, num_layers)
    student = copy.deepcopy(teacher)
    lm = student.language_model
    lm.model.layers = nn.ModuleList(lm.model.layers[i] for i in keep)
    text = dataclasses.replace(teacher.config.text, num_hidden_layers=num_layers)
    student.config = dataclasses.replace(teacher.config, text=text, notes=dict(teacher.config.notes))
    lm.config = text
    student.config.notes["distillation"] = f"student with teacher LLM layers {keep}"
    return student
