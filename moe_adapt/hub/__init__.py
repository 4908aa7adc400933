"""Sharing on the Hugging Face Hub: model cards for sliced models (`build_model_card`, `read_card_selection`,
`rebuild_from_card`) and loading any saved moe_adapt model (`load_model`)."""

from .cards import CardSelection, build_model_card, read_card_selection, rebuild_from_card
from .loading import load_model, weights_fingerprint

__all__ = [
    "CardSelection",
    "build_model_card",
    "load_model",
    "read_card_selection",
    "rebuild_from_card",
    "weights_fingerprint",
]
