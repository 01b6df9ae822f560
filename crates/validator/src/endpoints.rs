//! Which miner endpoints a validator invokes.
//!
//! Registration needs only a key pair, so a miner chooses the address the
//! validator will send invocations (and health probes) to. On a validator
//! whose miners are on the open internet, an endpoint on the validator's
//! own network (loopback, private ranges, link-local addresses such as a
//! cloud's metadata service) would turn it into a proxy into that network.
//! With `miner_endpoints = "public"` such endpoints are refused at
//! registration, and an endpoint named by a host name is pinned to the
//! public address it resolved to then, so that it cannot be pointed
//! elsewhere later (DNS rebinding): invocations and probes go to that
//! address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

/// The `miner_endpoints` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MinerEndpoints {
    /// Any address: local networks, `sluice up`, private clusters.
    #[default]
    Any,
    /// Globally routable addresses only, pinned at registration.
    Public,
}

/// Whether `ip` is a globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, 192.0.0.0/24.
        || (a == 192 && b == 0 && c == 0)
        // Benchmarking, 198.18.0.0/15.
        || (a == 198 && (b == 18 || b == 19))
        // Reserved, 240.0.0.0/4.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local, fc00::/7.
        || (first & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (first & 0xffc0) == 0xfe80
        // Documentation, 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // NAT64 and IPv4-compatible forms of other ranges: refused whole.
        || first == 0x0064
        || first == 0)
}

/// Checks an endpoint (`http://host[:port][/path]`, already validated as
/// such) under `policy`. Under either, its host must not be the
/// unspecified address (`0.0.0.0`, `[::]`): a miner listening on every
/// interface that registered it would have this validator dial itself.
/// Under `Public` its host must resolve to public addresses only; the
/// endpoint comes back with the host replaced by the first of them. Under
/// `Any` it comes back as it is.
pub async fn admit(policy: MinerEndpoints, endpoint: &str) -> Result<String, String> {
    let mut url =
        reqwest::Url::parse(endpoint).map_err(|e| format!("endpoint is not a URL: {e}"))?;
    let host = url.host_str().ok_or("endpoint names no host")?;
    let literal: Option<IpAddr> = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok();
    if literal.is_some_and(|ip| ip.to_canonical().is_unspecified()) {
        return Err(format!(
            "endpoint host {host} names no machine (it is what a server listening on every \
             interface binds): the miner must advertise an address this validator can dial"
        ));
    }
    if policy == MinerEndpoints::Any {
        return Ok(endpoint.to_string());
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<IpAddr> = match literal {
        Some(ip) => vec![ip],
        None => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("endpoint host `{host}` does not resolve: {e}"))?
            .map(|a| a.ip())
            .collect(),
    };
    let Some(first) = addrs.first().copied() else {
        return Err("endpoint host resolves to no address".into());
    };
    if let Some(private) = addrs.iter().find(|ip| !is_public(**ip)) {
        return Err(format!(
            "endpoint resolves to {private}, which is not a public address; \
             this validator invokes miners at public addresses only (miner_endpoints = \"public\")"
        ));
    }
    url.set_ip_host(first)
        .map_err(|()| "endpoint host cannot be replaced by its address".to_string())?;
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_private_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "203.0.114.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn only_public_endpoints_are_admitted_and_names_are_pinned() {
        let public = MinerEndpoints::Public;
        for refused in [
            "http://127.0.0.1:9000",
            "http://10.0.0.7",
            "http://[::1]:9000",
            "http://169.254.169.254/latest",
            "http://localhost:9000",
        ] {
            let e = admit(public, refused).await.unwrap_err();
            assert!(e.contains("not a public address"), "{refused}: {e}");
        }
        assert_eq!(
            admit(public, "http://8.8.8.8:9000/").await.unwrap(),
            "http://8.8.8.8:9000"
        );
        assert_eq!(
            admit(public, "http://[2606:4700::1111]:9000/miner")
                .await
                .unwrap(),
            "http://[2606:4700::1111]:9000/miner"
        );
        assert_eq!(
            admit(MinerEndpoints::Any, "http://localhost:9000")
                .await
                .unwrap(),
            "http://localhost:9000"
        );
    }
}
