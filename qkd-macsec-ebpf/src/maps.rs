//! The production object's maps (names, types and sizes from qkd-macsec-common; the loader pins
//! the first five per interface, docs/dataplane.md "Maps").

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use qkd_macsec_common::{
    Counter, DataplaneConfig, SaReg, SaStats, EVENTS_BYTES, IF_COUNTERS, LLDP_BUCKETS,
    LLDP_SOURCES_MAX, SA_SLOTS,
};

#[map(name = "QKD_CONFIG")]
pub static QKD_CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

#[map(name = "QKD_SA_REG")]
pub static QKD_SA_REG: Array<SaReg> = Array::with_max_entries(SA_SLOTS, 0);

#[map(name = "QKD_SA_STATS")]
pub static QKD_SA_STATS: PerCpuArray<SaStats> = PerCpuArray::with_max_entries(SA_SLOTS, 0);

#[map(name = "QKD_IF_STATS")]
pub static QKD_IF_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(IF_COUNTERS, 0);

#[map(name = "QKD_EVENTS")]
pub static QKD_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-source LLDP token buckets (GCRA state), bounded by the LRU.
#[map(name = "QKD_LLDP_SOURCES")]
pub static QKD_LLDP_SOURCES: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(LLDP_SOURCES_MAX, 0);

/// The peer's and the shared (all other sources) LLDP token buckets.
#[map(name = "QKD_LLDP_BUCKETS")]
pub static QKD_LLDP_BUCKETS: Array<u64> = Array::with_max_entries(LLDP_BUCKETS, 0);
