//! The TUN interface: created by name with the tunnel address and MTU, and up.
//!
//! Offloads are asked for (`IFF_VNET_HDR` + TSO/GSO through tun-rs): the kernel
//! then hands us TCP segments of up to 64 KB in one read, which tun-rs splits
//! into MTU-sized packets, and coalesces our writes (GRO). Kernels or containers
//! that refuse offloads get a plain TUN.

use tun_rs::{DeviceBuilder, SyncDevice};

use super::settings::VpnConfig;

/// Creates the interface `config.interface` with `config.address` and `config.mtu`.
pub fn create(config: &VpnConfig) -> std::io::Result<SyncDevice> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(&config.interface)
            .ipv4(config.address.addr(), config.address.prefix_len(), None)
            .mtu(config.mtu)
            .offload(offload)
            .tx_queue_len(1000)
            .build_sync()
    };
    match build(true) {
        Ok(dev) => Ok(dev),
        Err(e) => {
            tracing::warn!(interface = %config.interface, error = %e, "TUN offloads unavailable; using a plain TUN");
            build(false)
        }
    }
}
