"""Recursive config-dict merging with mmengine's inheritance rules."""
import copy


def merge_dicts(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base`` as mmengine merges a child
    config into its ``_base_``: nested dicts merge key by key, any other value
    replaces, and ``_delete_=True`` in an override dict replaces the base dict
    whole. Returns plain dicts (``ConfigDict`` inputs are converted)."""
    from mmengine.config import Config, ConfigDict
    merged = Config._merge_a_into_b(copy.deepcopy(dict(override)), ConfigDict(copy.deepcopy(dict(base))))
    return merged.to_dict() if hasattr(merged, 'to_dict') else dict(merged)
