//! ETSI GS QKD 014 V1.1.1: the REST client an SAE uses to get keys from its KME over mutual TLS
//! ([`client`]), the wire types ([`wire`]) and the operator CLI ([`cli`]).

pub mod cli;
pub mod client;
pub mod wire;

pub use client::{
    Etsi014Error, Key, KeyAvailability, KmeClient, KmeClientConfig, KmeStatus, RetryPolicy,
};
