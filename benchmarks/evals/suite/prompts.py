"""The suite's prompt suffixes, appended to its questions as LLaVA-1.5's evaluation prompts do (lmms-eval's
post_prompt). The bridge's stage-2 mix (bridge.data) imports them to teach the same answer formats; this module
imports nothing, so that import stays light."""

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
YESNO = " Please answer yes or no."  # MME's yes/no questions (before SHORT in the bridge's questions)
