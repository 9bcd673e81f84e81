"""tiergate's cache: L1 (RAM LRU of rendered answers), L2 (LMDB on local disk,
shared by the processes of a host), L3 (Redis, shared by every host), the
Bloom filter of L2's keys, and the tiered lookup that composes them with
single-flight in front of an Upstream that scores misses.

Imports no torch, transformers, grpc or gateway code: the gateway process must
stay light.
"""

from cache.breaker import BreakerState, CircuitBreaker
from cache.entry import BadValue, Entry, Source, ValueCodec
from cache.keys import KEY_SIZE, Keyer, normalize_text
from cache.l1 import KeyFilter
from cache.l1_memory import MemoryTier
from cache.l2_lmdb import LmdbConfig, LmdbTier
from cache.l3_redis import RedisConfig, RedisTier
from cache.tier import CacheTier
from cache.tiered import Answer, CacheOptions, TieredCache
from cache.upstream import Failed, ModelRef, Outcome, Scored, Upstream

__all__ = [
    "Answer",
    "BadValue",
    "BreakerState",
    "CacheOptions",
    "CacheTier",
    "CircuitBreaker",
    "Entry",
    "Failed",
    "KEY_SIZE",
    "KeyFilter",
    "Keyer",
    "LmdbConfig",
    "LmdbTier",
    "MemoryTier",
    "ModelRef",
    "Outcome",
    "RedisConfig",
    "RedisTier",
    "Scored",
    "Source",
    "TieredCache",
    "Upstream",
    "ValueCodec",
    "normalize_text",
]
