"""Student initialisation by layer selection (as DistilBERT / "shrink and fine-tune" students): the
student keeps a subset of the teacher's decoder blocks, and every other tensor (embeddings, final
norm, LM head, vision tower, projector) as the teacher has it.

Which blocks: ``"ends"`` keeps the first ⌈N/2⌉ and the last ⌊N/2⌋, ``"front"`` the first N−1 and the
last, ``"even"`` an evenly spaced subset, first and last included. Ends is the default: distilled on
POPE questions alone from the default model (one epoch, 10 of 30 blocks; TRAINING.md), blocks 0–4 and
25–29 reached POPE F1 0.84–0.88 (the teacher: 0.83–0.90), blocks 0–8 and 29 0.77–0.80, evenly spaced
ones stayed at chance (0.51–0.55): the image is read in the first blocks and the answer formed in the
last, and the middle blocks are the most redundant, as LLM pruning studies find (Gromov et al., 2024).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

from torch import nn

from edge_mllm.config import LAYER_SELECTIONS
from edge_mllm.errors import OptionError
from edge_mllm.model.mllm import MultimodalLM


def select_layers(num_teacher_layers: int, num_student_layers: int, selection: str = "ends") -> list[int]:
    """The teacher block indices a student keeps (``selection``: see the module docstring); the last
    block is always kept (it feeds the final norm and the LM head)."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise OptionError(f"a student needs 1 to {num_teacher_layers} layers (got {num_student_layers})")
    if selection not in LAYER_SELECTIONS:
        raise OptionError(f"layer selection must be one of {', '.join(LAYER_SELECTIONS)} (got {selection!r})")
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    if selection in ("ends", "front"):
        first = (num_student_layers + 1) // 2 if selection == "ends" else num_student_layers - 1
        return [*range(first), *range(num_teacher_layers - num_student_layers + first, num_teacher_layers)]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [round(i * step) for i in range(num_student_layers)]


def make_student(teacher: MultimodalLM, layers: Sequence[int]) -> MultimodalLM:
    """A deep copy of ``teacher`` whose LLM keeps the blocks ``layers`` (teacher indices, in order; e.g.
    ``select_layers``'s)."""
    num_teacher = teacher.config.text.num_hidden_layers
    keep = list(layers)
    if not keep or any(not 0 <= i < num_teacher for i in keep):
        raise OptionError(f"a student keeps some of the teacher's blocks 0 to {num_teacher - 1} (got {keep})")
    student = copy.deepcopy(teacher)
    lm = student.language_model
    lm.model.layers = nn.ModuleList(lm.model.layers[i] for i in keep)
    text = dataclasses.replace(teacher.config.text, num_hidden_layers=len(keep))
    student.config = dataclasses.replace(teacher.config, text=text, notes=dict(teacher.config.notes))
    lm.config = text
    student.config.notes["distillation"] = f"student with teacher LLM layers {keep}"
    return student
