//! The agent: per-link control logic ([`core`], sans-IO) and the IO loop that drives it with
//! the real KME client, kernel MACsec, the eBPF data plane and LLDP ([`run`]).

pub mod bench;
pub mod core;
pub mod ledger;
pub mod record;
pub mod run;
pub mod statefile;
