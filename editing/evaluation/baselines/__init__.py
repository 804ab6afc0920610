"""Baseline editors to compare EMSEdit with, each with the editor's interface (`propose` -> `EditPlan`).

- `ft.py`: constrained fine-tuning of the edited modules (FT-L, as in ROME and EasyEdit).
"""
