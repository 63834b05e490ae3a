"""Data: problem loaders (:mod:`.problems`), the prompts of both layers (:mod:`.prompts`), final-answer
extraction and equivalence (:mod:`.answers`), the bundled arithmetic task (:mod:`.arithmetic`,
:mod:`.bundled`) and what a run trains and evaluates on (:mod:`.train_data`)."""
