"""The privacy modes: one table of the named modes (`primis ambiguate --privacy NAME`,
`primis.share(..., privacy=NAME)`), each with its obfuscation settings, its key cost and what it
was measured to leak, and the warning every mode but the private one gives.

Only strict is private: in the others the public vectors depend on the code, so a public file
links to its image (`primis.linkage`); they buy a smaller key with that leak. The figures come
from ``privacy.json`` beside this module, written by ``benchmarks/linkage.py`` (the full report
is docs/linkage.json; docs/privacy.md discusses it). Any setting that is not a named mode's is
recorded as "custom".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from primis.config import ObfuscationConfig
from primis.obfuscation import effective, reveals_nothing

FIGURES = Path(__file__).with_name("privacy.json")  # written by benchmarks/linkage.py
CUSTOM = "custom"
# What a mode that is not private leaks, as its warning says it.
LINKS = (
    "links each public file to its image: anyone who holds a copy of the image can tell "
    "which public file it is (re-identification)"
)
SHOWS = "leaks the image to an attacker who trains on images of the same kind"
MEASURED = "measured in docs/privacy.md; only --privacy strict is private"


@dataclass(frozen=True)
class Linkage:
    """How well an attacker who holds the image finds its public file (`primis.linkage`)."""

    top1: float  # share of public files whose original the attacker ranked first
    auc: float  # ROC AUC of "same image" over all (public file, candidate) pairs
    chance: float  # top-1 by chance: 1 / candidates
    candidates: int
    at_chance: bool  # top-1, top-5 and AUC all within their 95% intervals of chance

    def describe(self) -> str:
        verdict = "at chance" if self.at_chance else "above chance"
        return (
            f"{verdict}: top-1 {self.top1:.2f} against chance {self.chance:.2f}, AUC "
            f"{self.auc:.2f}, of {self.candidates} candidates"
        )


@dataclass(frozen=True)
class PrivacyMode:
    """One named privacy mode: its settings in words and as `ObfuscationConfig`, its key bits
    against strict's and its linkage, as measured (``privacy.json``)."""

    name: str
    words: str  # what the settings do, for --privacy's help
    settings: ObfuscationConfig
    key_ratio: float
    linkage: Linkage

    @property
    def private(self) -> bool:
        return reveals_nothing(self.settings)

    @property
    def warning(self) -> str | None:
        return privacy_warning(self.settings)

    def summary(self) -> str:
        """The mode in --privacy's help: what it costs and leaks."""
        linkage = f"linkage {self.linkage.describe()}"
        if self.private:
            return f"{self.name} (default, the only private one: {self.words}; {linkage})"
        leak = "the public file links to its image"
        if shows_image(self.settings):
            leak += " and the image leaks"
        saving = f"{1 - self.key_ratio:.0%} fewer key bits"
        return f"{self.name} ({self.words}: {saving}; {leak}, {linkage})"


def _modes() -> dict[str, PrivacyMode]:
    """The table: each mode's settings and words here, its figures from ``privacy.json``."""
    figures = json.loads(FIGURES.read_text())["modes"]
    defined = {
        "strict": ("the public file is independent of the image", 1.0, True),
        "compact": ("half the noise", 0.5, True),
        "paper": ("public signs", 1.0, False),
    }
    modes = {}
    for name, (words, fill, mask_signs) in defined.items():
        settings = ObfuscationConfig(fill=fill, mask_signs=mask_signs, permute_atoms=False)
        measured = figures[name]
        modes[name] = PrivacyMode(
            name, words, settings, measured["key_ratio"], Linkage(**measured["linkage"])
        )
    return modes


PRIVACY_MODES = _modes()


def privacy_help() -> str:
    """The help of --privacy, from the table."""
    *first, last = (mode.summary() for mode in PRIVACY_MODES.values())
    return (
        f"a named privacy mode (docs/privacy.md): {', '.join(first)} or {last}; --fill and "
        "--mask-signs change it (recorded as custom)"
    )


def shows_image(obfuscation: ObfuscationConfig) -> bool:
    """Whether a trained attacker was measured to see the image in such public files (public
    signs, or a fill below 0.5, in the model's atom order)."""
    applied = effective(obfuscation)
    return not applied.permute_atoms and (not applied.mask_signs or applied.fill < 0.5)


def privacy_warning(obfuscation: ObfuscationConfig) -> str | None:
    """What a mode that is not private leaks: every mode whose public vectors depend on the
    image links them to it, and some show the image too; None for the private mode."""
    applied = effective(obfuscation)
    if reveals_nothing(applied):
        return None
    name = privacy_preset_name(applied)
    if name != CUSTOM:
        label = f"--privacy {name}"
    elif not applied.mask_signs:
        label = "public signs"
    else:
        label = f"--fill {applied.fill:g} with masked signs"
    what = f"{SHOWS} and {LINKS}" if shows_image(applied) else LINKS
    return f"{label} is not private: it {what} ({MEASURED})"


def privacy_preset_name(obfuscation: ObfuscationConfig) -> str:
    """The mode whose settings ``obfuscation`` applies (size classes or not), or "custom"."""
    applied = effective(obfuscation).model_copy(update={"pad_size_class": False})
    named = (mode.name for mode in PRIVACY_MODES.values() if effective(mode.settings) == applied)
    return next(named, CUSTOM)
