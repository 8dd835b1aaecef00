//! ferry's site PKI.
//!
//! Every site runs an agent, and agents talk over untrusted WANs. They know
//! each other by a private CA: each site holds a certificate naming it (its
//! DNS subject-alt-name is the site name), and both ends of every connection
//! present and verify one over TLS 1.3. So a connection always tells each side
//! which site is at the other end, proved by the CA's signature.
//!
//! * [`init_ca`] and [`issue_site`] create the CA and site certificates
//!   (behind `ferry pki init` and `ferry pki issue NAME`);
//! * [`load_identity`] loads a site's [`SiteIdentity`], whose
//!   [`server_config`](SiteIdentity::server_config) and
//!   [`client_config`](SiteIdentity::client_config) build rustls configs;
//! * [`connect`] and [`accept`] run the handshake over a `TcpStream` (or a
//!   wrapper of one, see [`PeerAddress`]) and return the peer's site name; [`peer_site`] reads it from any finished
//!   connection.

mod ca;
mod explain;
mod identity;
mod layout;
mod tls;

pub use ca::{init_ca, issue_site};
pub use explain::describe_tls_error;
pub use identity::{load_identity, SiteIdentity};
pub use layout::validate_site_name;
pub use tls::{accept, connect, peer_site, PeerAddress, HANDSHAKE_TIMEOUT};

// Re-exported so that dependents name exactly the rustls types this crate
// builds, without keeping their own versions in step.
pub use rustls;
pub use tokio_rustls;
