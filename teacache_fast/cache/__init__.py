"""The cache's state machine: settings, the call clock, per-branch state and
its numerics, stats. Nothing here knows how it is attached to a model.

config        TeaCacheConfig; the one place forced steps become values
clock         call -> (branch, step, new generation); every reset rule
state         per-branch buffers (host-read mode) and the residual numerics
decision      the host-side decision of the host-read mode (fp32, kernel bits)
device_state  the sync-free mode's device-side schedule, buffers and span end
stats         the one stats schema, cache_bytes
"""
from .clock import CallClock, CallContext, Tick
from .config import TeaCacheConfig
from .decision import HostDecision
from .device_state import DeviceSchedule, SyncFreeBranch
from .state import BranchState, CacheState

__all__ = ["TeaCacheConfig", "CallClock", "CallContext", "Tick", "HostDecision", "BranchState", "CacheState",
           "DeviceSchedule", "SyncFreeBranch"]
