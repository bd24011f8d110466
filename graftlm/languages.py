"""Language codes, normalised once: every stage compares and looks up languages through this module.

A recipe may name a language as ISO 639-1 (`sw`), ISO 639-3 (`swh`, or the macrolanguage `swa`), ISO 639-2/B
(`chi`), BCP 47 (`zh-Hans-CN`, `sw-KE`) or FineWeb2's `<iso639-3>_<Script>` (`swh_Latn`, `cmn_Hani`). All of them
become one canonical code:

    the ISO 639-1 code where the language has one (sw, vi, zh), else its ISO 639-3 code (yue, swc, ace),
    followed by `_<Script>` only when the script is not the language's usual one (sr_Latn, ace_Arab).

A macrolanguage resolves to the individual language FineWeb2 (and datatrove) stand it for: `sw`, `swa` → Swahili
`swh_Latn`; `zh`, `zho`, `cmn`, `zho_Hans` → Mandarin `cmn_Hani`; `ar` → `arb_Arab`. Individual languages inside a
macrolanguage stay themselves: Cantonese `yue` is not `zh`, Congo Swahili `swc` is not `sw`.

The table of languages and scripts is datatrove's (`assets/tokenizer_assignment.csv`: ISO 639-3 code, script,
ISO 639-1 code, and which individual language and script a code stands for by default), the same table datatrove
assigns word tokenizers from and FineWeb2 names its languages by. `langcodes` (the IANA registry and ISO 639-2)
parses BCP 47 tags and maps three-letter ISO 639-2 codes (`zho`, `ger`) and retired codes (`iw`, `in`) to ISO 639-1.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from graftlm.errors import GraftError

UNSPACED_SCRIPTS = frozenset({"Hani", "Jpan", "Thai", "Laoo", "Khmr", "Mymr", "Tibt"})
"""Scripts written without spaces between words: their fertility is counted per character."""
SCRIPT_ALIASES = {"Hans": "Hani", "Hant": "Hani", "Hira": "Jpan", "Kana": "Jpan", "Hrkt": "Jpan", "Kore": "Hang"}
"""Script subtags (ISO 15924) that FineWeb2 and datatrove fold into a broader one."""
_NOT_LANGUAGES = {"und", "zxx", "mis", "mul"}  # undetermined, no linguistic content, uncoded, multiple


class UnknownLanguage(GraftError, ValueError):
    """A code that names no known language (a ValueError too, so that recipe validation reports its key)."""


@dataclass(frozen=True)
class Language:
    code: str
    """The canonical code (see the module docstring): `sw`, `zh`, `yue`, `sr_Latn`."""
    iso639_3: str
    """The individual language: `swh`, `cmn`."""
    script: str
    """ISO 15924: `Latn`, `Hani`, `Cyrl`."""
    name: str

    @property
    def fineweb2(self) -> str:
        """FineWeb2's name for it (its configs and rehydration weights), also datatrove's word-tokenizer key."""
        return f"{self.iso639_3}_{self.script}"

    @property
    def spaces(self) -> bool:
        """Whether the language separates words by spaces (Chinese, Japanese, Thai, Khmer, ... do not)."""
        return self.script not in UNSPACED_SCRIPTS

    @property
    def unit(self) -> str:
        """What fertility is counted per: `word` (whitespace-separated) or `character`."""
        return "word" if self.spaces else "character"


@dataclass(frozen=True)
class _Table:
    scripts: dict[str, list[str]]
    """ISO 639-3 code → its scripts, the default one first."""
    names: dict[str, str]
    code_1: dict[str, str]
    """ISO 639-3 code of the individual language an ISO 639-1 code stands for → that ISO 639-1 code."""
    individual: dict[str, str]
    """ISO 639-1 code → the ISO 639-3 code of the individual language it stands for (sw → swh)."""


@lru_cache(maxsize=1)
def _table() -> _Table:
    scripts: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    code_1: dict[str, str] = {}
    individual: dict[str, str] = {}
    path = resources.files("datatrove").joinpath("assets/tokenizer_assignment.csv")
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            code, script = row["code_3"], row["script"]
            if code in _NOT_LANGUAGES:
                continue
            known = scripts.setdefault(code, [])
            if script not in known:
                known.insert(0, script) if row["default_script"] == "TRUE" else known.append(script)
            names.setdefault(code, row["name"] or code)
            if row["code_1"] and row["default_code_1"] == "TRUE":
                code_1[code] = row["code_1"]
                individual[row["code_1"]] = code
    return _Table(scripts, names, code_1, individual)


def _parse(code: str) -> tuple[str, str | None]:
    """(language subtag, script subtag or None) of `vi`, `vi-VN`, `__label__vie_Latn`, `zh-Hans-CN`; ("", None)
    for anything else (`my-own-set` is not Burmese)."""
    parts = code.strip().removeprefix("__label__").replace("_", "-").split("-")
    language_part, rest = parts[0], parts[1:]
    is_script = [len(p) == 4 and p.isalpha() for p in rest]
    is_region = [(len(p) == 2 and p.isalpha()) or (len(p) == 3 and p.isdigit()) for p in rest]
    if not (2 <= len(language_part) <= 3 and language_part.isalpha() and language_part.isascii()) \
            or not all(a or b for a, b in zip(is_script, is_region)) or sum(is_script) > 1:
        return "", None
    script = next((p.title() for p, yes in zip(rest, is_script) if yes), None)
    return language_part.lower(), script


def _individual(subtag: str) -> str | None:
    """The ISO 639-3 code of the individual language a language subtag stands for, or None."""
    table = _table()
    if len(subtag) == 2 and subtag in table.individual:
        return table.individual[subtag]
    import langcodes

    try:
        standard = langcodes.standardize_tag(subtag)  # zho → zh, swa → sw, ger → de, iw → he
    except (ValueError, langcodes.tag_parser.LanguageTagError):
        return None
    alpha2 = standard.split("-")[0]
    if len(alpha2) == 2 and alpha2 in table.individual:
        if len(subtag) == 2 or langcodes.Language.get(alpha2).to_alpha3() == subtag \
                or langcodes.Language.get(alpha2).to_alpha3(variant="B") == subtag:
            return table.individual[alpha2]  # the code *is* the ISO 639-1 language (not one of its members)
    return subtag if subtag in table.scripts else None


@lru_cache(maxsize=4096)
def language(code: str) -> Language:
    """The language a code names; UnknownLanguage when it names none."""
    if not isinstance(code, str):
        raise UnknownLanguage(f"expected a language code such as sw, swh or swh_Latn, got {code!r}")
    subtag, script = _parse(code)
    iso639_3 = _individual(subtag) if subtag else None
    if iso639_3 is None:
        raise UnknownLanguage(f"unknown language code '{code}'{_suggestion(code)} (ISO 639-1 such as sw, ISO 639-3 "
                              f"such as swh, or FineWeb2's swh_Latn)")
    table = _table()
    scripts = table.scripts[iso639_3]
    script = SCRIPT_ALIASES.get(script, script) if script else scripts[0]
    if script not in scripts:
        raise UnknownLanguage(f"'{code}': {table.names[iso639_3]} is not known in the script {script} (known: "
                              f"{', '.join(scripts)})")
    short = table.code_1.get(iso639_3, iso639_3)
    canonical = short if script == scripts[0] else f"{short}_{script}"
    return Language(canonical, iso639_3, script, table.names[iso639_3])


def _suggestion(code: str) -> str:
    """`; did you mean sw (Swahili (individual language))?` for a language's English name or a near-miss of one."""
    by_name: dict[str, str] = {}
    for iso, name in _table().names.items():
        for key in (name.lower(), name.split(" (")[0].lower()):
            by_name.setdefault(key, iso)
    close = difflib.get_close_matches(code.strip().lower(), list(by_name), n=1, cutoff=0.8)
    if not close:
        return ""
    found = language(by_name[close[0]])
    return f"; did you mean {found.code} ({found.name})?"


def normalize_language(code: str) -> str:
    """The canonical code: `swh_Latn`, `swa`, `SW`, `sw-KE` → `sw`. UnknownLanguage for an unknown code."""
    return language(code).code


def language_or_none(code: str | None) -> Language | None:
    """The language a code names, or None (for names that may or may not be codes: eval set names, labels)."""
    if not code:
        return None
    try:
        return language(code)
    except UnknownLanguage:
        return None


def label_language(label: str) -> str:
    """A language identifier's label (`__label__cmn_Hani`, `zh`) as a canonical code; a label that names no
    known language is kept, lower-cased and without the fastText prefix, so that it is still counted."""
    found = language_or_none(label)
    return found.code if found else label.strip().removeprefix("__label__").lower()


def same_language(a: str | None, b: str | None) -> bool:
    """Whether two codes (or set names that are codes) name the same language: `vi` and `vie_Latn` do; names that
    are not language codes are equal only as written."""
    if a is None or b is None:
        return False
    found_a, found_b = language_or_none(a), language_or_none(b)
    if found_a is not None and found_b is not None:
        return found_a.code == found_b.code
    return a == b


def fertility_unit(name: str | None) -> str:
    """`character` for a language written without spaces, else `word` (also when `name` is not a language)."""
    found = language_or_none(name)
    return found.unit if found else "word"
