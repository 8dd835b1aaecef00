//! What a lab is made of: named sites (each a network namespace with addresses in the
//! benchmarking range 198.18.0.0/15) and a link with its own parameters between every pair.
use crate::link::LinkParams;
use crate::units::{parse_duration, parse_loss, parse_queue, parse_rate_bps};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// The site every lab has for probes, unless asked not to.
pub const CLIENT_SITE: &str = "client";
const MAX_SITES: usize = 32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    /// 1-based; fixes the site's addresses.
    pub index: u8,
}

impl Site {
    /// The site's own address on its WAN interface.
    pub fn wan_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.index)
    }
    /// The site's guest segment (a bridge): 198.19.<index>.0/24, the site itself at .1.
    pub fn guest_subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.index, 0)
    }
    pub fn guest_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.index, 1)
    }
    /// The site's VXLAN tunnel endpoint for the stretched guest segment (`stretch`), also on
    /// its WAN interface. An address of its own so that its route can carry encapsulated
    /// full-size frames while the site's own traffic keeps a 1500-byte path.
    pub fn vtep_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 1, self.index)
    }
    /// The site that owns `addr`, by the address plan above.
    pub fn owns(&self, addr: Ipv4Addr) -> bool {
        let o = addr.octets();
        (o[0..2] == [198, 18] && (o[2] == 0 || o[2] == 1) && o[3] == self.index) || (o[0..3] == [198, 19, self.index])
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub a: String,
    pub b: String,
    pub params: LinkParams,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabConfig {
    /// Prefix of every namespace and the name of the state directory: labs of different names
    /// coexist (tests use their own).
    pub name: String,
    pub sites: Vec<Site>,
    pub links: Vec<Link>,
}

impl LabConfig {
    /// Sites in order, a full mesh of links with `default`, then per-link overrides of the form
    /// `a-b:rtt=120ms,rate=1gbit,loss=0.1%,jitter=2ms,queue=bdp`.
    pub fn new(name: &str, site_names: &[String], default: LinkParams, overrides: &[String]) -> Result<Self> {
        validate_name("lab", name)?;
        if site_names.len() < 2 {
            bail!("a lab needs at least two sites (got {})", site_names.len());
        }
        if site_names.len() > MAX_SITES {
            bail!("at most {MAX_SITES} sites");
        }
        let mut sites = Vec::new();
        for (i, s) in site_names.iter().enumerate() {
            validate_name("site", s)?;
            if sites.iter().any(|x: &Site| &x.name == s) {
                bail!("site {s:?} is named twice");
            }
            sites.push(Site { name: s.clone(), index: (i + 1) as u8 });
        }
        let mut links = Vec::new();
        for (i, a) in sites.iter().enumerate() {
            for b in &sites[i + 1..] {
                links.push(Link { a: a.name.clone(), b: b.name.clone(), params: default.clone() });
            }
        }
        let mut lab = LabConfig { name: name.to_string(), sites, links };
        for o in overrides {
            lab.apply_override(o)?;
        }
        Ok(lab)
    }

    fn apply_override(&mut self, spec: &str) -> Result<()> {
        let (pair, settings) = spec
            .split_once(':')
            .with_context(|| format!("--link {spec:?}: expected A-B:key=value,… (e.g. a-b:rtt=120ms,rate=1gbit)"))?;
        let idx = self.link_index(pair)?;
        let p = &mut self.links[idx].params;
        for kv in settings.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').with_context(|| format!("--link {spec:?}: {kv:?} is not key=value"))?;
            match k.trim() {
                "rtt" => p.rtt = parse_duration(v)?,
                "rate" => p.rate_bps = parse_rate_bps(v)?,
                "loss" => p.loss = parse_loss(v)?,
                "jitter" => p.jitter = parse_duration(v)?,
                "queue" => p.queue = parse_queue(v)?,
                other => bail!("--link {spec:?}: unknown setting {other:?} (rtt, rate, loss, jitter, queue)"),
            }
        }
        Ok(())
    }

    pub fn site(&self, name: &str) -> Result<&Site> {
        self.sites.iter().find(|s| s.name == name).with_context(|| {
            let names: Vec<_> = self.sites.iter().map(|s| s.name.as_str()).collect();
            format!("unknown site {name:?}: lab {:?} has sites {}", self.name, names.join(", "))
        })
    }

    /// `a-b` or `b-a` → the index of that link.
    pub fn link_index(&self, pair: &str) -> Result<usize> {
        let (a, b) = pair.split_once('-').with_context(|| format!("{pair:?} is not a link: expected A-B, e.g. a-b"))?;
        self.site(a)?;
        self.site(b)?;
        if a == b {
            bail!("{pair:?} joins a site to itself");
        }
        Ok(self
            .links
            .iter()
            .position(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
            .expect("full mesh has every pair"))
    }

    pub fn namespace(&self, site: &Site) -> String {
        format!("{}-{}", self.name, site.name)
    }

    pub fn site_for_addr(&self, addr: Ipv4Addr) -> Option<&Site> {
        self.sites.iter().find(|s| s.owns(addr))
    }
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 12
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.as_bytes()[0].is_ascii_lowercase();
    if !ok {
        bail!("{what} name {name:?}: use 1–12 lowercase letters or digits, starting with a letter");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::QueueLimit;
    use std::time::Duration;

    fn default_params() -> LinkParams {
        LinkParams { rtt: Duration::from_millis(100), rate_bps: 1_000_000_000, loss: 0.0, jitter: Duration::ZERO, queue: QueueLimit::Bdp }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn full_mesh_with_overrides() {
        let lab = LabConfig::new("t", &names(&["a", "b", "c"]), default_params(), &["c-a:rtt=20ms,loss=1%".into()]).unwrap();
        assert_eq!(lab.links.len(), 3);
        let ac = &lab.links[lab.link_index("a-c").unwrap()];
        assert_eq!(ac.params.rtt, Duration::from_millis(20));
        assert_eq!(ac.params.loss, 0.01);
        assert_eq!(lab.links[lab.link_index("a-b").unwrap()].params, default_params());
    }

    #[test]
    fn addresses_route_to_their_site() {
        let lab = LabConfig::new("t", &names(&["a", "b"]), default_params(), &[]).unwrap();
        assert_eq!(lab.site_for_addr("198.18.0.2".parse().unwrap()).unwrap().name, "b");
        assert_eq!(lab.site_for_addr("198.19.1.10".parse().unwrap()).unwrap().name, "a");
        assert_eq!(lab.site_for_addr("198.18.1.2".parse().unwrap()).unwrap().name, "b");
        assert!(lab.site_for_addr("198.18.2.1".parse().unwrap()).is_none());
        assert!(lab.site_for_addr("198.18.0.9".parse().unwrap()).is_none());
        assert!(lab.site_for_addr("10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn bad_names_and_links_are_named_in_the_error() {
        let e = LabConfig::new("t", &names(&["a", "b"]), default_params(), &["a-x:rtt=1ms".into()]).unwrap_err();
        assert!(e.to_string().contains("unknown site \"x\""), "{e}");
        assert!(LabConfig::new("t", &names(&["a", "a"]), default_params(), &[]).is_err());
        assert!(LabConfig::new("t", &names(&["A"]), default_params(), &[]).is_err());
        assert!(LabConfig::new("t", &names(&["a", "b"]), default_params(), &["a-b:speed=1".into()]).is_err());
        assert!(LabConfig::new("t", &names(&["a", "b"]), default_params(), &["a-b:rate=0".into()]).is_err());
    }
}
