//! The edge between the config schema and the sans-IO logic: a link's settings translated into
//! the parameter types of the key exchange, the key profiles, the AKL watchdog and the per-link
//! core. The logic knows nothing of the schema (no `Link`, no serde defaults); only this file
//! knows both.

use super::Link;
use crate::agent::core::CoreConfig;
use crate::keyx::machine::KeyxConfig;
use crate::keyx::Role;
use crate::profile::{Params, ProfileKind};
use crate::watchdog::Limits;

impl Link {
    /// The key exchange's settings. `initial_seq`, `incarnation` and `local_sci` are zero here:
    /// they belong to one start of the agent, and the core takes them from its `Start`.
    pub fn keyx_config(&self) -> KeyxConfig {
        KeyxConfig {
            role: self.role(),
            local_sae: self.local_sae_id.clone(),
            peer_sae: self.peer_sae_id.clone(),
            retransmit_initial: self.keyx.retransmit_initial.get(),
            retransmit_max: self.keyx.retransmit_max.get(),
            hello_interval: self.keyx.hello_interval.get(),
            availability_window: self.kme.availability_window.get(),
            max_rx_per_sec: self.keyx.max_rx_per_sec,
            initial_seq: 0,
            incarnation: 0,
            local_sci: 0,
        }
    }

    /// The key profile's settings.
    pub fn profile_params(&self) -> Params {
        let role = self.role();
        let (master_sae, slave_sae) = match role {
            Role::Master => (self.local_sae_id.clone(), self.peer_sae_id.clone()),
            Role::Slave => (self.peer_sae_id.clone(), self.local_sae_id.clone()),
        };
        Params {
            kind: self.profile,
            role,
            cipher: self.cipher,
            master_sae,
            slave_sae,
            key_request_interval: self.key_request_interval.get(),
            buffer: self.sak.buffer as usize,
            cak_lifetime: self.cak.lifetime.get(),
            tolerated_failures: self.cak.tolerated_failures,
        }
    }

    /// The AKL watchdog's limits.
    pub fn akl_limits(&self) -> Limits {
        let tolerated_fetch_failures = match self.profile {
            ProfileKind::Cak => self.cak.tolerated_failures,
            // A full buffer rides out k failed requests.
            ProfileKind::Sak => self.sak.buffer,
        };
        Limits {
            max_age: self.akl.max_age.get(),
            max_pn: self.akl.effective_max_pn(self.cipher),
            rollover_at: self.akl.rollover_at,
            warn_at: self.akl.warn_at,
            tolerated_fetch_failures,
        }
    }

    /// Everything the per-link core needs.
    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            label: self.label().to_owned(),
            keyx: self.keyx_config(),
            profile: self.profile_params(),
            limits: self.akl_limits(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keyx::wire::KeyRole;

    #[test]
    fn limits_from_config() {
        let cfg = crate::config::Config::parse(
            include_str!("../../../docs/sample-config.toml"),
            "sample",
        )
        .unwrap();
        // The sample's first link: sak profile, gcm-aes-256, default AKL, a buffer of 10.
        let l = cfg.link[0].akl_limits();
        assert_eq!(l.max_pn, 0xC000_0000);
        assert_eq!(l.max_age, Duration::from_secs(600));
        assert_eq!(
            l.tolerated_fetch_failures, 10,
            "a full sak buffer rides out k failures"
        );
    }

    #[test]
    fn params_from_config_resolve_roles() {
        let cfg = crate::config::Config::parse(
            include_str!("../../../docs/sample-config.toml"),
            "sample",
        )
        .unwrap();
        let p = cfg.link[0].profile_params();
        assert_eq!(p.role, Role::Master);
        assert_eq!(
            (p.master_sae.as_str(), p.slave_sae.as_str()),
            ("SAE_A", "SAE_B")
        );
        assert_eq!(p.key_role(), KeyRole::Sak);
        assert_eq!(p.buffer, 10);
        let p = cfg.link[1].profile_params();
        assert_eq!(p.key_role(), KeyRole::Cak);
        assert_eq!(p.qkd_key_len(), 32);
    }
}
