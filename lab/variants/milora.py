"""MiLoRA (Wang et al. 2024, arXiv:2406.09044): start the adapter on W's minor singular directions.

The opposite of PiSSA (lab/variants/pissa.py). With W = U S V^T, singular values in decreasing
order, and r the rank, A and B take the r *smallest* singular triplets and the frozen base keeps
the principal part (section 3 of the paper):

    B = U_r' sqrt(S_r' / scaling),  A = sqrt(S_r' / scaling) V_r'^T,  W_res = W - scaling * B A

(r' the last r indices), so base + adapter compute exactly W at the start and ΔW = scaling B A
has W's r smallest singular values. The idea: the principal directions hold what pretraining
learned; adapting in the minor ones leaves that knowledge alone, while their small singular
values keep the starting update small, much like LoRA's B = 0.

Everything else is PiSSA's: the same SVD, the refusal of a 4-bit base or of directions that could
never train, the residual put back when the adapter is dropped, all-or-nothing in add_lora, and
the batched engine's per-configuration residual base. PEFT 0.21 has no MiLoRA init (its
init_lora_weights offers PiSSA, OLoRA, CorDA, EVA and LoftQ, no minor components), so the tests
check the paper's definition directly.
"""

from __future__ import annotations

from ..config import register_init
from .pissa import singular_directions_init

__all__: list[str] = []

register_init(
    singular_directions_init(
        "milora",
        "MiLoRA",
        "MiLoRA (Wang et al. 2024): A, B from W's minor (smallest) r singular directions, W keeps "
        "the rest",
        minor=True,
    )
)
