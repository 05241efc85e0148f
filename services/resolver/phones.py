"""Phone numbers in international form: phonenumbers' parse and validity, without its per-call overhead.

`phonenumbers.parse` handles any spelling and `is_valid_number` tries a number against up to ten
patterns of its region, each compiled-cache lookup and length test done again per number. A
fetched contact is already "+" and digits, so most of that work repeats for every SMS of a
campaign. Here the calling code and national number are read off directly when parse would do
nothing else with them, and each region's patterns are joined, per number length, into one regex
built the first time the region is seen. The answers equal phonenumbers' own: tests compare both
over every calling code and region.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneMetadata

_ASK_PARSE = re.compile("")  # a calling code whose metadata the fast path does not read
_national_prefixes: dict[int, re.Pattern[str] | None] = {}  # calling code -> national_prefix_for_parsing

# The types _number_type_helper tries after the general description; any match makes a number valid.
_TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan", "voicemail")


def split_international(compact: str) -> tuple[int, str] | None:
    """(calling code, national significant number) of "+" and 6-15 digits, when `phonenumbers.parse`
    would read them off as they stand; None when parse itself must look.

    Most numbers need none of parse's text handling: the calling code is the first known prefix of
    1-3 digits, and the rest is the national number as it stands when it neither starts with 0
    (Italian leading zeros) nor with the country's national prefix (which parse may strip). Such a
    number's E.164 form is `compact` itself.
    """
    digits = compact[1:]
    if digits[0] != "0":
        for size in (1, 2, 3):
            country_code = int(digits[:size])
            if country_code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
                continue
            prefix = _national_prefix(country_code)
            national = digits[size:]
            if prefix is not _ASK_PARSE and national[0] != "0" and (prefix is None or not prefix.match(national)):
                return country_code, national
            break
    return None


def _national_prefix(country_code: int) -> re.Pattern[str] | None:
    try:
        return _national_prefixes[country_code]
    except KeyError:
        pass
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    prefix: re.Pattern[str] | None = _ASK_PARSE
    if metadata is not None:
        pattern = metadata.national_prefix_for_parsing
        prefix = re.compile(pattern) if pattern else None
    _national_prefixes[country_code] = prefix
    return prefix


class _Patterns:
    """One region's metadata as two regex tests: the general description, then any number type."""

    def __init__(self, metadata: PhoneMetadata) -> None:
        self._metadata = metadata
        general = metadata.general_desc
        pattern = general.national_number_pattern if general is not None else None
        self.leading_digits = re.compile(metadata.leading_digits) if metadata.leading_digits is not None else None
        self._general_lengths = frozenset(general.possible_length) if general is not None else frozenset()
        self._general = re.compile(pattern) if pattern else None
        self._types_by_length: dict[int, re.Pattern[str] | None] = {}  # built per length on first use

    def valid(self, nsn: str) -> bool:
        """`_number_type_helper(nsn, metadata) != UNKNOWN`: the general description and one type match."""
        general = self._general
        length = len(nsn)
        if general is None or (self._general_lengths and length not in self._general_lengths):
            return False
        if general.fullmatch(nsn) is None:
            return False
        try:
            types = self._types_by_length[length]
        except KeyError:
            types = self._types_by_length[length] = self._types_for_length(length)
        return types is not None and types.fullmatch(nsn) is not None

    def _types_for_length(self, length: int) -> re.Pattern[str] | None:
        """The patterns of the types a number of this length is tried against, as one alternation."""
        names = [*_TYPES, "fixed_line"]
        if not self._metadata.same_mobile_and_fixed_line_pattern:
            names.append("mobile")
        patterns = []
        for name in names:
            desc = getattr(self._metadata, name)
            if desc is None or not desc.national_number_pattern:
                continue
            if desc.possible_length and length not in desc.possible_length:
                continue
            patterns.append(f"(?:{desc.national_number_pattern})")
        return re.compile("|".join(patterns)) if patterns else None


@dataclass(frozen=True)
class _Region:
    select: _Patterns | None  # picks the region among those of a shared calling code; None: skipped
    validate: _Patterns | None  # None: is_valid_number_for_region refuses the region outright


_regions: dict[int, list[_Region]] = {}  # calling code -> its regions, in phonenumbers' order


def is_valid_number(number: phonenumbers.PhoneNumber) -> bool:
    """`phonenumbers.is_valid_number(number)`: region_code_for_number, then is_valid_number_for_region."""
    return is_valid_national(number.country_code, phonenumbers.national_significant_number(number))


def is_valid_national(country_code: int, nsn: str) -> bool:
    """`is_valid_number` of the number with this calling code and national significant number."""
    try:
        regions = _regions[country_code]
    except KeyError:
        regions = _regions[country_code] = _regions_of(country_code)
    if not regions:
        return False
    if len(regions) == 1:
        chosen, valid = regions[0], False
    else:
        chosen, valid = _choose(regions, nsn)
    return chosen is not None and chosen.validate is not None and (valid or chosen.validate.valid(nsn))


def _choose(regions: list[_Region], nsn: str) -> tuple[_Region | None, bool]:
    """The first region whose leading digits match the number or, lacking those, whose patterns do;
    and whether that region's validation is known to pass already (it chose by the same patterns: a
    US, UK or Australian number's regexes run once rather than twice)."""
    for region in regions:
        patterns = region.select
        if patterns is None:
            continue
        if patterns.leading_digits is not None:
            if patterns.leading_digits.match(nsn):
                return region, False
        elif patterns.valid(nsn):
            return region, patterns is region.validate
    return None, False


def _regions_of(country_code: int) -> list[_Region]:
    codes = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    regions = []
    for code in codes:
        select = PhoneMetadata.metadata_for_region(code.upper(), None) if len(codes) > 1 else None
        validate = PhoneMetadata.metadata_for_region_or_calling_code(country_code, code.upper())
        if validate is not None and code != phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
            if phonenumbers.country_code_for_valid_region(code) != country_code:
                validate = None
        validate_patterns = _Patterns(validate) if validate is not None else None
        select_patterns = None
        if select is not None:
            select_patterns = validate_patterns if select is validate else _Patterns(select)
        regions.append(_Region(select_patterns, validate_patterns))
    return regions
