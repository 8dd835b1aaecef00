//! The stretched guest segment: the guest bridges of all sites but the probe site joined over
//! VXLAN across the emulated WAN, as operators stretch a VLAN between data centres, so a guest
//! keeps its address and its gateway (its home site's bridge) while it runs in another site.
//! The client still reaches a guest through its home site, whose bridge sends the frames on
//! over the WAN: the VXLAN packets cross the forwarder and see that link's delay, rate and loss.
//!
//! One VXLAN device per site with a static all-zeros FDB entry per peer (head-end replication):
//! broadcasts and unknown unicast reach every other site, and since a bridge never sends a frame
//! back out of the port it came in on, a frame from one remote site is never relayed to another
//! (split horizon: no loops, however many sites). The bridge port learns which MACs are remote
//! and the VXLAN device learns at which site, so known unicast goes to that site only; a moved
//! guest's announce (QEMU's gratuitous RARP, a broadcast) re-teaches both in every site.
//!
//! Encapsulation adds 50 bytes and guests keep MTU 1500, so the underlay carries 1550-byte
//! packets: the tunnel endpoints have addresses of their own (`Site::vtep_addr`) whose route has
//! MTU 1550, while `wan0`'s MTU and the route of the sites' own traffic stay at 1500 — TCP
//! between sites keeps its MSS, and tools that rewrite that route (the benches' initcwnd) cannot
//! undo the larger MTU. A TUN device does not hold transmitted packets to its MTU and the
//! forwarder reads up to 2 KiB, so the 1550-byte packets pass whole, never fragmented.
//!
//! Everything here lives inside the sites' namespaces (or on `wan0`, which dies with the
//! forwarder), so `lab down` removes it with them.
use crate::forwarder::WAN_IF;
use crate::lab::GUEST_BRIDGE;
use crate::link::MTU;
use crate::sys::{ip_in, run};
use crate::topology::{LabConfig, Site, CLIENT_SITE};
use anyhow::Result;
use std::process::Command;

/// The VXLAN device in each stretched site, a port of its guest bridge.
pub const VXLAN_IF: &str = "vx0";
/// The segment's VXLAN network identifier: the lab has one segment, so any fixed value.
pub const VNI: u32 = 1919;
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) headers and the inner Ethernet header (14).
pub const OVERHEAD: usize = 50;
/// The MTU of the tunnel endpoints' route: a full-size guest frame, encapsulated.
pub const UNDERLAY_MTU: usize = MTU + OVERHEAD;
/// Where every site's tunnel endpoint is (`Site::vtep_addr`).
const VTEP_NET: &str = "198.18.1.0/24";

/// Whether a site's guest segment is part of the stretched segment: the probe site stands for
/// clients outside the sites and only ever reaches guests by routing.
pub fn is_stretched(site: &Site) -> bool {
    site.name != CLIENT_SITE
}

pub fn stretched_sites(cfg: &LabConfig) -> Vec<&Site> {
    cfg.sites.iter().filter(|s| is_stretched(s)).collect()
}

/// Whether `join` has run: a lab left up by a ferry without the stretched segment is rebuilt.
pub fn joined(cfg: &LabConfig) -> bool {
    let sites = stretched_sites(cfg);
    sites.len() < 2 || sites.iter().all(|s| ip_in(&cfg.namespace(s), &["link", "show", VXLAN_IF]).is_ok())
}

/// Joins the stretched sites' bridges. Runs after the forwarder has made `wan0` in every site.
pub fn join(cfg: &LabConfig) -> Result<()> {
    let sites = stretched_sites(cfg);
    if sites.len() < 2 {
        return Ok(());
    }
    for site in &sites {
        let ns = cfg.namespace(site);
        let vtep = site.vtep_addr().to_string();
        ip_in(&ns, &["addr", "replace", &format!("{vtep}/32"), "dev", WAN_IF])?;
        ip_in(&ns, &["route", "replace", VTEP_NET, "dev", WAN_IF, "src", &vtep, "mtu", &UNDERLAY_MTU.to_string()])?;
        // `learning` (the default) on the device: it maps each remote MAC to its site's VTEP.
        ip_in(&ns, &["link", "add", VXLAN_IF, "type", "vxlan", "id", &VNI.to_string(), "local", &vtep, "dstport", &VXLAN_PORT.to_string()])?;
        ip_in(&ns, &["link", "set", VXLAN_IF, "mtu", &MTU.to_string(), "master", GUEST_BRIDGE, "up"])?;
        for peer in sites.iter().filter(|p| p.index != site.index) {
            let dst = peer.vtep_addr().to_string();
            run(Command::new("bridge").args(["-n", &ns, "fdb", "append", "00:00:00:00:00:00", "dev", VXLAN_IF, "dst", &dst]))?;
        }
    }
    Ok(())
}
