"""tiergate's cache: L1 (RAM LRU + Bloom filter of L2 keys), L2 (LMDB on local
disk, shared by the processes of a host), L3 (Redis, shared by every host),
and the tiered lookup that composes them with single-flight.

Imports no torch, transformers, grpc or gateway code: the gateway process must
stay light.
"""

from cache.breaker import BreakerState, CircuitBreaker
from cache.entry import Entry, Source, decode_entry, encode_entry
from cache.keys import KEY_SIZE, Keyer, normalize_text
from cache.l1 import KeyFilter, MemoryTier
from cache.l2_lmdb import LmdbConfig, LmdbTier
from cache.l3_redis import RedisConfig, RedisTier
from cache.tier import CacheTier
from cache.tiered import Answer, Scored, Scorer, TieredCache

__all__ = [
    "Answer",
    "BreakerState",
    "CacheTier",
    "CircuitBreaker",
    "Entry",
    "KEY_SIZE",
    "KeyFilter",
    "Keyer",
    "LmdbConfig",
    "LmdbTier",
    "MemoryTier",
    "RedisConfig",
    "RedisTier",
    "Scored",
    "Scorer",
    "Source",
    "TieredCache",
    "decode_entry",
    "encode_entry",
    "normalize_text",
]
