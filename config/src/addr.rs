//! Which resolved addresses a seller's endpoint may reach. A seller names its own `base_url`;
//! without this check it could point the gateway (or the control plane's credential check) at
//! the operator's own network: loopback, private ranges, link-local (the cloud metadata service
//! at 169.254.169.254), and the other ranges that are not the public internet.
//!
//! The check runs on addresses, after resolution, so every spelling of a host — decimal or hex
//! IPv4, `127.1`, IPv4-mapped IPv6, a trailing dot, a name that resolves there, a name that
//! resolves elsewhere the next time (rebinding) — meets the same rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is outside the public internet (and so refused for sellers' endpoints unless
/// the operator allows internal upstreams).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_internal_v4(v4),
            None => is_internal_v6(v6),
        },
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
}

/// The IPv4 address an IPv6 one carries: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated) and NAT64 (`64:ff9b::a.b.c.d`) all reach that IPv4 host.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4];
    let compatible = s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified();
    (nat64 || compatible).then_some(low)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::ToSocketAddrs;

    /// Resolves like the gateway does (the system resolver), so the spellings meet the check
    /// the way an upstream's host would.
    fn resolved(host: &str) -> Vec<IpAddr> {
        (host, 443)
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn every_spelling_of_an_internal_host_is_internal_after_resolution() {
        let spellings = [
            "127.0.0.1",
            "127.1",
            "2130706433", // decimal
            "0x7f000001", // hex
            "0x7f.0.0.1", // hex octet
            "0177.0.0.1", // octal octet
            "localhost",
            "::1",
            "::ffff:127.0.0.1", // IPv4-mapped
            "::ffff:7f00:1",
            "::127.0.0.1",     // IPv4-compatible
            "64:ff9b::7f00:1", // NAT64
            "0.0.0.0",
            "0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254", // cloud metadata
            "::ffff:169.254.169.254",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "224.0.0.1",
            "255.255.255.255",
        ];
        for host in spellings {
            let ips = resolved(host);
            assert!(!ips.is_empty(), "{host} did not resolve");
            assert!(ips.iter().all(|ip| is_internal(*ip)), "{host} → {ips:?}");
        }
        // A trailing dot resolves only where a resolver answers root-qualified names (not on
        // every test machine); where it does, it is the same host.
        assert!(resolved("localhost.").iter().all(|ip| is_internal(*ip)));
    }

    #[test]
    fn public_addresses_are_not_internal() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "104.18.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }
}
