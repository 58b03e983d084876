"""How the cache attaches to a model: the mechanics, no state rules.

patches       install / restore of method overrides (knows nothing of TeaCache)
cached_model  one install for both modes; routes model, block, tail, end and
              scheduler events to a runner
host          HostRunner: the decision read on the host once per call
device        DeviceRunner: sync_free=True, the decision stays on the device
cond          torch.cond around a block (the sync-free skip)
batch         per-sample slicing, pure functions
indicator     the adapter's indicator in the form the cache's op takes
_compat       torch workarounds, each naming its bug
"""
from .cached_model import CachedModel

__all__ = ["CachedModel"]
